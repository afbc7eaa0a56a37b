"""Gradient (activation) checkpointing of MoDE models: recomputed layers see their forward's routing.

MoDE layers read the routing plan that the model's forward set up and cleared. Hugging Face
checkpointing (``model.gradient_checkpointing_enable()``, reentrant or not) reruns each decoder
layer's forward during backward, after that forward has returned, and several forwards may run
before one backward (a task batch and a KD batch). So each checkpointing module's
``_gradient_checkpointing_func`` is wrapped: at the original call it takes a snapshot of the routing
(plan and teacher flags), and the function it checkpoints runs with that snapshot, the first time and
when recomputed. The wrapping happens at the start of every model forward (``mode.model``'s
pre-hook), so it holds whether checkpointing was enabled before or after the MoDE layers were built.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .layer import RoutingState, routed_layers

# Attribute Hugging Face sets on every module it checkpoints (GradientCheckpointingLayer, and the
# decoder of models that checkpoint from their layer loop).
CHECKPOINT_FUNC_ATTR = "_gradient_checkpointing_func"


class RoutedCheckpoint:
    """A checkpoint function (``torch.utils.checkpoint.checkpoint`` with Hugging Face's kwargs) whose
    checkpointed function runs under the routing of the forward that called it."""

    def __init__(self, checkpoint_func: Callable, state: RoutingState):
        self.checkpoint_func = checkpoint_func
        self.state = state

    def __call__(self, function: Callable, *args, **kwargs):
        snapshot = self.state.snapshot()

        def routed(*inner_args, **inner_kwargs):
            with self.state.restored(snapshot):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint_func(routed, *args, **kwargs)


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that Hugging Face may give a checkpoint function."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def wrap_checkpoint_functions(modules: Sequence[nn.Module], state: RoutingState) -> None:
    """Wrap each module's checkpoint function (if it has one) in a ``RoutedCheckpoint`` on ``state``."""
    for module in modules:
        func = module.__dict__.get(CHECKPOINT_FUNC_ATTR)
        if func is None or (isinstance(func, RoutedCheckpoint) and func.state is state):
            continue
        if isinstance(func, RoutedCheckpoint):  # attached again: a new routing state
            func = func.checkpoint_func
        setattr(module, CHECKPOINT_FUNC_ATTR, RoutedCheckpoint(func, state))


def unwrap_checkpoint_functions(modules: Sequence[nn.Module]) -> None:
    """Undo ``wrap_checkpoint_functions``: each module gets its own checkpoint function back."""
    for module in modules:
        func = module.__dict__.get(CHECKPOINT_FUNC_ATTR)
        if isinstance(func, RoutedCheckpoint):
            setattr(module, CHECKPOINT_FUNC_ATTR, func.checkpoint_func)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on Hugging Face gradient checkpointing of ``model`` (a MoDE model from ``mode.apply_mode``
    or a PEFT model with MoDE layers); returns ``model``.

    Equivalent to ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
    use_reentrant})`` on the Hugging Face model (inside a PEFT wrapper if any), through the name the
    installed transformers prefers. Decoder layers are recomputed only in training mode
    (``model.train()``), as Hugging Face does.
    """
    from .hf.models import hf_model

    if not routed_layers(model):
        raise ValueError(f"{type(model).__name__} has no MoDE layers; use mode.apply_mode or mode.MoDEPeftConfig")
    host = hf_model(model)
    kwargs = {"use_reentrant": bool(use_reentrant)}
    if callable(getattr(host, "activation_checkpointing_enable", None)):  # transformers >= 5.x; the old name warns
        host.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(host, "gradient_checkpointing_enable", None)):
        host.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(host).__name__} has no gradient_checkpointing_enable (not a Hugging Face model)")
    return model
