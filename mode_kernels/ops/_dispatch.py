"""Calling an op: through its torch.library custom op only where something needs the custom op.

The custom op is what torch.compile, export, torch.jit.trace, fake tensors, tensor subclasses, dispatch modes and
functorch transforms see: one opaque node with a fake implementation. In plain eager mode it only adds dispatch
work (schema defaults, redispatch, the dynamo-disabled wrapper, the custom op's own autograd wrapper): about
0.1 ms a forward + backward at tiny shapes, measured by ``python -m bench.overhead``. There the ops call the same
implementation directly, through a ``torch.autograd.Function`` built from the same forward, setup_context and
backward that the custom op registers, so results and gradients are those of the custom op.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

# Exact types only: any other tensor subclass (FakeTensor, FunctionalTensor, DTensor, ...) takes the custom op.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# Private torch functions that tell plain eager mode apart: no dispatch mode, torch function mode, functorch
# transform or jit trace active. They are not public API and may move between torch versions (the GPU machine and
# CI run different ones): each is looked up and called once here, and if any is missing or raises, every call
# takes the custom op, which is always correct (only slower).
_PRIVATE_STATE = ("_len_torch_dispatch_stack", "_is_torch_function_mode_enabled",
                  "_are_functorch_transforms_active", "_get_tracing_state")


def _probe_private_state() -> tuple[Callable[[], object], ...] | None:
    """The functions of ``_PRIVATE_STATE`` when all exist and answer, else None."""
    functions = tuple(getattr(torch._C, name, None) for name in _PRIVATE_STATE)
    if not all(callable(f) for f in functions):
        return None
    try:
        for f in functions:
            f()
    except Exception:
        return None
    return functions


_STATE = _probe_private_state()
# Whether plain eager calls may skip the custom op; False forces the custom op everywhere (tests set it so).
FAST_PATH = _STATE is not None
_dispatch_stack, _function_mode, _functorch_transforms, _tracing_state = _STATE or (None,) * 4


def _plain_eager(args: tuple) -> bool:
    if not FAST_PATH or torch.compiler.is_compiling():
        return False
    try:
        if _dispatch_stack() or _function_mode() or _functorch_transforms() or _tracing_state() is not None:
            return False
    except Exception:  # a private function that changed behaviour: the custom op is always correct
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


def call(custom_op: Callable, direct: Callable, *args):
    """``direct(*args)`` in plain eager mode, else ``custom_op(*args)``; both must compute the same thing."""
    return direct(*args) if _plain_eager(args) else custom_op(*args)


def call_differentiable(custom_op: Callable, function: type[torch.autograd.Function], *args):
    """A custom op with autograd: in plain eager mode ``function.apply(*args)``, or its forward alone when no
    gradient can flow (grad mode off or no input requiring grad: inference, decoding), which skips
    ``Function.apply``'s own cost (about 30 us)."""
    if not _plain_eager(args):
        return custom_op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.implementation(*args)


def autograd_function(forward: Callable, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """The ``torch.autograd.Function`` equivalent of a custom op's implementation and ``register_autograd``;
    ``implementation`` is the bare forward.

    Its forward takes ``ctx`` and calls ``setup_context`` itself: a Function with a separate
    ``setup_context`` binds its arguments with ``inspect.signature`` on every call (about 0.1 ms).
    """
    def forward_with_context(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{forward.__name__}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_context),
        "backward": staticmethod(backward),
        "implementation": staticmethod(forward),
    })



class InputGrads:
    """An autograd backward's view of its forward's inputs by name: which of the named ones need a gradient, and
    the per-input tuple it returns from gradients given by name (None for every other input). The positions are
    worked out once, from ``forward``'s parameters and the names, so the per-call cost is two short loops."""

    def __init__(self, forward: Callable, names: tuple[str, ...]):
        inputs = tuple(inspect.signature(forward).parameters)
        self._positions = tuple(inputs.index(name) for name in names)
        slot = {name: i for i, name in enumerate(names)}
        self._slots = tuple(slot.get(name) for name in inputs)

    def needs(self, needs_input_grad: tuple[bool, ...]) -> list[bool]:
        """``ctx.needs_input_grad`` of the named inputs, in the names' order (False for an input that is None)."""
        return [needs_input_grad[i] for i in self._positions]

    def returns(self, grads: Sequence[torch.Tensor | None] = ()) -> tuple[torch.Tensor | None, ...]:
        """The backward's return value from the named inputs' gradients, in the names' order (none: all None)."""
        if not grads:
            return (None,) * len(self._slots)
        return tuple(None if i is None else grads[i] for i in self._slots)
