"""MoDE on a whole Hugging Face decoder: apply_mode, the per-forward routing hooks, teacher_mode.

One routing plan per forward: a pre-hook on the model (and on its decoder, for direct decoder
calls such as ``mode.kd_loss``'s) takes ``modality_ids=`` or derives them from ``input_ids``
with the config's ``ModalitySpec``, plans the routing once and shares it with every MoDE layer
through a ``RoutingState``; a post-hook clears it.

Cached generation: a token's modality may depend on earlier tokens (inside begin..end of an
image), which a cached step no longer sees. So each forward stores, on the cache object it
returns, whether each row ends inside an image, and the next forward with that cache continues
from it (the state travels with ``copy.deepcopy`` of the cache). Beam search reorders cache rows
without this state, so it is exact only while the beams of a row agree on being inside an image.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import mode_kernels as mk

from .config import MoDEConfig
from .gradient_checkpointing import checkpointing_modules, unwrap_checkpoint_functions, wrap_checkpoint_functions
from .hf.models import cache_in, decoder_of, hf_model
from .layer import OUTSIDE_FORWARD, MoDELinear, RoutingState, routed_layers

# Attribute of a KV cache object: bool [B], whether each row's cached tokens end inside an image.
INSIDE_IMAGE_ATTR = "_mode_inside_image"
_HOOKS_ATTR = "_mode_routing_hooks"


def apply_mode(model: nn.Module, config: MoDEConfig) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by ``MoDELinear`` layers, in place.

    Every parameter of ``model`` is frozen except the new adapters (lora_A, lora_B, router), which
    are float32 on a float16/bfloat16 base unless ``config.autocast_adapter_dtype`` is False.
    Afterwards ``model(input_ids=...)`` derives each token's modality from its id with
    ``config.modality``; ``model(..., modality_ids=ids)`` gives them explicitly ([B, T] ints in
    {0, 1}). Returns ``model``.
    """
    if not isinstance(config, MoDEConfig):
        raise ValueError(f"config: expected a mode.MoDEConfig, got {type(config).__name__}")
    if routed_layers(model):
        raise ValueError("apply_mode: the model already has MoDE layers")
    targets = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in config.target_modules]
    missing = [t for t in config.target_modules if not any(name.rsplit(".", 1)[-1] == t for name, _ in targets)]
    if missing:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules: no module named {missing} in {type(model).__name__}; "
                         f"its nn.Linear modules are named {linears}")
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target_modules: {name} is a {type(module).__name__}, MoDE adapts nn.Linear only")
    model.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        layer = MoDELinear(module, rank=config.rank, alpha=config.alpha,
                           experts_per_modality=config.experts_per_modality, dropout=config.dropout,
                           autocast_adapter_dtype=config.autocast_adapter_dtype)
        layer.train(module.training)  # a model in eval mode keeps the adapters' dropout off
        setattr(model.get_submodule(parent_name), child, layer)
    attach_routing(model, config)
    return model


def attach_routing(model: nn.Module, config: MoDEConfig) -> nn.Module:
    """Give the MoDE layers of ``model`` one shared routing state and install the hooks that fill
    it on every forward. ``apply_mode`` and ``mode.MoDEPeftConfig`` models call it. Calling it again
    replaces the previous hooks.
    """
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoDE layers; use mode.apply_mode or mode.MoDEPeftConfig first")
    for name, layer in layers:
        if layer.experts_per_modality != config.experts_per_modality:
            raise ValueError(f"{name}: has experts_per_modality={layer.experts_per_modality}, the config says "
                             f"{config.experts_per_modality}")
    host = hf_model(model)
    for handle in getattr(host, _HOOKS_ATTR, ()):
        handle.remove()
    state = RoutingState(config, [layer for _, layer in layers])
    state.checkpointing_modules = checkpointing_modules(host)
    for name, layer in layers:
        layer.routing, layer.module_name = state, name
    handles = []
    for module in dict.fromkeys((host, decoder_of(host))):  # the same module once
        handles.append(module.register_forward_pre_hook(_pre_hook(state), with_kwargs=True))
        handles.append(module.register_forward_hook(_post_hook(state), with_kwargs=True, always_call=True))
    setattr(host, _HOOKS_ATTR, handles)
    return model


def detach_routing(model: nn.Module) -> nn.Module:
    """Remove the routing hooks ``attach_routing`` installed on ``model`` (a no-op without them) and
    detach its MoDE layers from the shared state: what PEFT's ``unload()`` and the deletion of the
    last adapter leave is a plain model again."""
    host = hf_model(model)
    for handle in host.__dict__.pop(_HOOKS_ATTR, ()):
        handle.remove()
    unwrap_checkpoint_functions(checkpointing_modules(host))
    for _, layer in routed_layers(model):
        layer.routing = None
    return model


def routing_state(model: nn.Module) -> RoutingState:
    """The routing state shared by ``model``'s MoDE layers."""
    for _, layer in routed_layers(model):
        if layer.routing is not None:
            return layer.routing
    raise ValueError(f"{type(model).__name__} has no MoDE layers attached to routing; use mode.apply_mode")


def _pre_hook(state: RoutingState):
    def hook(module, args, kwargs):
        modality_ids = kwargs.pop("modality_ids", None)
        state.depth += 1
        if state.depth > 1:  # the model's forward calling its decoder: the plan is already set
            return args, kwargs
        wrap_checkpoint_functions(state.checkpointing_modules, state)
        try:
            _begin_forward(state, kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds"),
                           modality_ids, cache_in(kwargs))
        except BaseException:
            state.depth -= 1
            raise
        return args, kwargs
    return hook


def _post_hook(state: RoutingState):
    def hook(module, args, kwargs, output):
        state.depth = max(state.depth - 1, 0)
        if state.depth == 0:
            if state.pending_inside_image is not None:
                cache = _cache_in_output(output)
                if cache is not None:
                    setattr(cache, INSIDE_IMAGE_ATTR, state.pending_inside_image)
            state.plan, state.pending_inside_image = None, None
            state.missing_reason = OUTSIDE_FORWARD
        return output
    return hook


def _cache_in_output(output):
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
    return next((v for v in values if hasattr(v, "get_seq_length")), None)


def _begin_forward(state: RoutingState, input_ids, inputs_embeds, modality_ids, cache) -> None:
    spec = state.config.modality
    if input_ids is not None:
        shape = tuple(input_ids.shape)
    elif inputs_embeds is not None:
        shape = tuple(inputs_embeds.shape[:-1])
    else:
        shape = None
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    state.plan, state.pending_inside_image = None, None

    inside_image, derived = None, None
    if input_ids is not None:
        carry = None
        if spec.has_markers and past > 0:
            carry = getattr(cache, INSIDE_IMAGE_ATTR, None)
            if carry is not None and tuple(carry.shape) != shape[:-1]:
                carry = None
        if carry is not None or past == 0 or not spec.has_markers:
            derived, inside_image = spec.modality_ids_and_state(input_ids, carry)
    state.pending_inside_image = inside_image if spec.has_markers else None

    if modality_ids is not None:
        if not isinstance(modality_ids, torch.Tensor):
            raise ValueError(f"modality_ids: expected an integer tensor, got {type(modality_ids).__name__}")
        if shape is not None and tuple(modality_ids.shape) != shape:
            raise ValueError(f"modality_ids: expected shape {list(shape)} (the input's [batch, tokens]), "
                             f"got {list(modality_ids.shape)}")
        ids = modality_ids
    elif derived is not None:
        ids = derived
    else:
        state.missing_reason = (
            "the forward got no input_ids to derive them from (inputs_embeds only); pass modality_ids="
            if input_ids is None else
            "the KV cache holds earlier tokens but not whether each row ended inside an image (it was not "
            "filled by this model's forward, or its batch size changed); pass modality_ids=")
        # Raise before any layer runs (a failing layer would leave a half-updated KV cache),
        # unless no MoDE layer runs an adapter in this forward (teacher mode, adapters disabled or deleted).
        if any(layer.runs_adapter for layer in state.layers):
            raise ValueError(f"MoDE: no modality ids for this forward: {state.missing_reason}")
        return
    try:
        state.plan = mk.plan_routing(ids.to(device=_device(input_ids, inputs_embeds, ids)),
                                     len(state.config.experts_per_modality))
    except ValueError as exc:
        raise ValueError(f"modality_ids: {exc}") from None


def _device(*tensors) -> torch.device:
    return next(t.device for t in tensors if t is not None)


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every MoDE layer of ``model`` returns its frozen base layer's output and
    computes no adapter: the model is exactly the one before ``apply_mode`` (the KD teacher)."""
    layers = [layer for _, layer in routed_layers(model)]
    if not layers:
        raise ValueError(f"teacher_mode: {type(model).__name__} has no MoDE layers")
    previous = [layer.teacher for layer in layers]
    for layer in layers:
        layer.teacher = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.teacher = was
