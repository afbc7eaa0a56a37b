"""modality_lora_linear: a frozen linear plus per-modality LoRA experts, as a torch custom op.

The forward and the backward are each one custom op (``mode_kernels::routed_lora`` and
``mode_kernels::routed_lora_backward``) whose implementation is picked by the ``backend``
string, so ``torch.compile(fullgraph=True)`` sees two opaque nodes and no graph break.
A routing plan travels into the ops as its tensors. The forward op also returns what the
backend's backward reuses (the Triton kernels' gated rank intermediate H and gates, the native
kernels' shrink; empty for the reference), saved for the backward and never differentiated.
In plain eager mode the API calls the same forward and backward without the custom ops (``_dispatch``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backends
from .._validation import check_experts_per_modality, check_float, check_same_device, check_shape
from ..routing import RoutingPlan, plan_routing
from ._dispatch import autograd_function, call, call_differentiable

# Order of the differentiable inputs in the backward op's outputs.
_GRAD_NAMES = ("x", "lora_input", "weight", "bias", "lora_a", "lora_b", "router_weight")


def _plan(order, offsets, modality, num_modalities) -> RoutingPlan:
    return RoutingPlan(order, offsets, modality, num_modalities)


def _saved_like(impl, x, lora_a, router_weight, experts_per_modality) -> tuple[Tensor, Tensor]:
    """What the implementation's forward keeps for its backward, as empty tensors (none: two empties)."""
    if hasattr(impl, "saved_like"):
        return impl.saved_like(x, lora_a, router_weight, experts_per_modality)
    return x.new_empty(0), x.new_empty(0)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_input: Tensor | None,
             order: Tensor, offsets: Tensor, modality: Tensor,
             lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
             experts_per_modality: list[int], scaling: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, *saved): saved is what the backend's backward reuses (the Triton kernels' H and gates)."""
    impl = backends.implementation(backend, "routed_lora")
    plan = _plan(order, offsets, modality, len(experts_per_modality))
    args = (x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight, tuple(experts_per_modality), scaling)
    if hasattr(impl, "routed_lora_forward_saving"):
        y, saved = impl.routed_lora_forward_saving(*args)
        return y, *saved
    return impl.routed_lora_forward(*args), x.new_empty(0), x.new_empty(0)


_routed_lora = torch.library.custom_op("mode_kernels::routed_lora", _forward, mutates_args=())


@_routed_lora.register_fake
def _(x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
      experts_per_modality, scaling, backend):
    impl = backends.implementation(backend, "routed_lora")
    return x.new_empty(x.shape[0], weight.shape[0]), *_saved_like(impl, x, lora_a, router_weight,
                                                                  tuple(experts_per_modality))


def _backward_grads(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                    lora_input: Tensor | None, order: Tensor, offsets: Tensor, modality: Tensor,
                    lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
                    saved_h: Tensor, saved_gates: Tensor,
                    experts_per_modality: list[int], scaling: float, backend: str,
                    needs: list[bool]) -> list[Tensor]:
    impl = backends.implementation(backend, "routed_lora")
    plan = _plan(order, offsets, modality, len(experts_per_modality))
    args = (grad_y.contiguous(), x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight,
            tuple(experts_per_modality), scaling, tuple(needs))
    if hasattr(impl, "routed_lora_forward_saving"):
        grads = impl.routed_lora_backward(*args, saved=(saved_h, saved_gates))
    else:
        grads = impl.routed_lora_backward(*args)
    # Custom ops cannot return None: an empty tensor stands for "not requested".
    return [g if g is not None else x.new_empty(0) for g in grads]


_routed_lora_backward = torch.library.custom_op("mode_kernels::routed_lora_backward", _backward_grads,
                                                mutates_args=())


@_routed_lora_backward.register_fake
def _(grad_y, x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight, saved_h,
      saved_gates, experts_per_modality, scaling, backend, needs):
    like = (x, lora_input, weight, bias, lora_a, lora_b, router_weight)
    return [torch.empty_like(t) if n else x.new_empty(0) for t, n in zip(like, needs)]


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
     experts_per_modality, scaling, backend) = inputs
    _, saved_h, saved_gates = output
    ctx.mark_non_differentiable(saved_h, saved_gates)
    ctx.set_materialize_grads(False)  # no zero gradients allocated for the saved outputs
    ctx.save_for_backward(x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
                          saved_h, saved_gates)
    ctx.meta = (list(experts_per_modality), scaling, backend)


def _backward(ctx, grad_y, _grad_h, _grad_gates):
    (x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight, saved_h,
     saved_gates) = ctx.saved_tensors
    experts_per_modality, scaling, backend = ctx.meta
    n = ctx.needs_input_grad
    if grad_y is None:  # y did not reach the loss (gradients are not materialised)
        return (None,) * 13
    needs = [n[0], n[3] and lora_input is not None, n[1], n[2] and bias is not None, n[7], n[8],
             n[9] and router_weight is not None]
    grads = call(_routed_lora_backward, _backward_grads, grad_y, x, weight, bias, lora_input, order, offsets,
                 modality, lora_a, lora_b, router_weight, saved_h, saved_gates, experts_per_modality, scaling,
                 backend, needs)
    dx, du, dw, db, da, dlb, dr = (g if need else None for g, need in zip(grads, needs))
    return dx, dw, db, du, None, None, None, da, dlb, dr, None, None, None


_routed_lora.register_autograd(_backward, setup_context=_setup_context)
_RoutedLora = autograd_function(_forward, _setup_context, _backward)


def modality_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, modality: Tensor | RoutingPlan,
                         lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None = None, *,
                         experts_per_modality: Sequence[int], scaling: float, lora_input: Tensor | None = None,
                         backend: str = "auto") -> Tensor:
    """A frozen linear with each token routed by its modality to that modality's LoRA experts.

    For a token t of modality m with experts S_m (experts are ordered by modality):
        g = softmax over S_m of (u_t @ router_weight[S_m].T), in float32 (g = 1 for one expert)
        y_t = x_t W^T + b + scaling * sum_{e in S_m} g_e (u_t A_e^T) B_e^T
    where u = lora_input (e.g. dropout(x)) or x.

    Args:
        x: [..., K] float32, bfloat16 or float16 (float64 with the torch backend).
        weight: [N, K]; bias: [N] or None.
        modality: integer ids of shape x.shape[:-1] in [0, M), or a plan from ``plan_routing``.
        lora_a: [E, r, K]; lora_b: [E, N, r]; router_weight: [E, K] (required if any modality has
            more than one expert).
        experts_per_modality: M ints >= 1, E = their sum (MoDE: (4, 1): 4 text experts, 1 image).
        scaling: LoRA scaling (alpha / r).
        lora_input: what the adapters and router see instead of x; same shape as x.
        backend: "auto", "torch", "triton" or "native".
    Returns:
        y [..., N] in x's dtype.
    """
    experts = check_experts_per_modality(experts_per_modality)
    num_modalities, num_experts = len(experts), sum(experts)
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., K], got a scalar")
    k = x.shape[-1]
    check_float(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight: expected shape [N, {k}] (K = x.shape[-1]), got {list(weight.shape)}")
    n = weight.shape[0]
    check_float(lora_a, "lora_a")
    check_float(lora_b, "lora_b")
    if lora_a.dim() != 3 or lora_a.shape[0] != num_experts or lora_a.shape[2] != k:
        raise ValueError(f"lora_a: expected shape [{num_experts}, r, {k}] (E = sum(experts_per_modality), "
                         f"K = x.shape[-1]), got {list(lora_a.shape)}")
    rank = lora_a.shape[1]
    check_shape(lora_b, "lora_b", (num_experts, n, rank), "[E, N, r] with E, r from lora_a, N from weight")
    if bias is not None:
        check_float(bias, "bias")
        check_shape(bias, "bias", (n,), "[N]")
    if router_weight is not None:
        check_float(router_weight, "router_weight")
        check_shape(router_weight, "router_weight", (num_experts, k), "[E, K]")
    elif max(experts) > 1:
        raise ValueError(f"router_weight: required when a modality has more than one expert "
                         f"(experts_per_modality={experts})")
    if lora_input is not None:
        check_float(lora_input, "lora_input")
        check_shape(lora_input, "lora_input", tuple(x.shape), "the shape of x")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling: expected a number, got {scaling!r}")
    check_same_device(x, "x", weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                      router_weight=router_weight, lora_input=lora_input)

    lead = tuple(x.shape[:-1])
    num_tokens = math.prod(lead)
    if isinstance(modality, RoutingPlan):
        plan = modality
        if plan.num_modalities != num_modalities:
            raise ValueError(f"modality: the plan has {plan.num_modalities} modalities, experts_per_modality "
                             f"has {num_modalities}")
        if plan.num_tokens != num_tokens:
            raise ValueError(f"modality: the plan covers {plan.num_tokens} tokens, x has {num_tokens}")
    elif isinstance(modality, Tensor):
        if tuple(modality.shape) != lead:
            raise ValueError(f"modality: expected shape {list(lead)} (x.shape[:-1]), got {list(modality.shape)}")
        plan = plan_routing(modality, num_modalities)
    else:
        raise ValueError(f"modality: expected an integer tensor or a RoutingPlan, got {type(modality).__name__}")
    check_same_device(x, "x", modality=plan.order)

    resolved = backends.resolve(backend, x.device, "routed_lora")
    # Skipped when already flat: a no-op reshape still costs a few microseconds a call.
    x2 = x if x.dim() == 2 else x.reshape(num_tokens, k)
    u2 = None if lora_input is None else lora_input.reshape(x2.shape)
    y, _, _ = call_differentiable(_routed_lora, _RoutedLora, x2, weight, bias, u2, plan.order, plan.offsets,
                                  plan.modality, lora_a, lora_b, router_weight, list(experts), float(scaling),
                                  resolved)
    return y if x.dim() == 2 else y.reshape(*lead, n)
