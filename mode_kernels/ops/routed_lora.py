"""modality_lora_linear: a frozen linear plus per-modality LoRA experts, as a torch custom op.

The forward and the backward are each one custom op (``mode_kernels::routed_lora`` and
``mode_kernels::routed_lora_backward``) whose implementation is picked by the ``backend``
string, so ``torch.compile(fullgraph=True)`` sees two opaque nodes and no graph break.
The custom ops take flat arguments (a routing plan as its tensors, the options as a list and a float, the needed
gradients as bools); ``_typed`` and ``_flat_grads`` / ``_typed_grads`` convert them to and from the backend
contract's types (``mode_kernels.contract.RoutedLoraBackend``). The forward op also returns what the backend's
backward reuses (``RoutedLoraSaved``), saved for the backward and never differentiated.
In plain eager mode the API calls the same forward and backward without the custom ops (``_dispatch``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backends
from .._validation import check_routed_lora
from ..contract import RoutedLoraGrads, RoutedLoraNeeds, RoutedLoraOptions, RoutedLoraSaved, routed_lora_options
from ..routing import RoutingPlan, routing_plan_for
from ._dispatch import InputGrads, autograd_function, call, call_differentiable


def _typed(order: Tensor, offsets: Tensor, modality: Tensor, experts_per_modality: list[int],
           scaling: float) -> tuple[RoutingPlan, RoutedLoraOptions]:
    """The custom ops' flat plan and options as the contract's types."""
    experts = tuple(experts_per_modality)
    return RoutingPlan(order, offsets, modality, len(experts)), routed_lora_options(experts, scaling)


def _flat_grads(grads: RoutedLoraGrads, x: Tensor) -> list[Tensor]:
    """Custom ops cannot return None: an empty tensor stands for "not needed"."""
    return [x.new_empty(0) if g is None else g for g in grads]


def _typed_grads(flat: list[Tensor], needs: RoutedLoraNeeds) -> RoutedLoraGrads:
    return RoutedLoraGrads._make([g if need else None for g, need in zip(flat, needs)])


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_input: Tensor | None,
             order: Tensor, offsets: Tensor, modality: Tensor,
             lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
             experts_per_modality: list[int], scaling: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, *saved): saved is what the backend's backward reuses (``RoutedLoraSaved``)."""
    plan, options = _typed(order, offsets, modality, experts_per_modality, scaling)
    y, saved = backends.implementation(backend, "routed_lora").routed_lora_forward(
        x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight, options)
    return y, *saved


_INPUT_GRADS = InputGrads(_forward, RoutedLoraGrads._fields)
_routed_lora = torch.library.custom_op("mode_kernels::routed_lora", _forward, mutates_args=())


@_routed_lora.register_fake
def _(x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
      experts_per_modality, scaling, backend):
    _, options = _typed(order, offsets, modality, experts_per_modality, scaling)
    saved = backends.implementation(backend, "routed_lora").saved_like(x, lora_a, router_weight, options)
    return x.new_empty(x.shape[0], weight.shape[0]), *saved


def _backward_grads(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                    lora_input: Tensor | None, order: Tensor, offsets: Tensor, modality: Tensor,
                    lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
                    saved_rank: Tensor, saved_gates: Tensor,
                    experts_per_modality: list[int], scaling: float, backend: str,
                    needs: list[bool]) -> list[Tensor]:
    plan, options = _typed(order, offsets, modality, experts_per_modality, scaling)
    grads = backends.implementation(backend, "routed_lora").routed_lora_backward(
        grad_y.contiguous(), x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight, options,
        RoutedLoraNeeds(*needs), RoutedLoraSaved(saved_rank, saved_gates))
    return _flat_grads(grads, x)


_routed_lora_backward = torch.library.custom_op("mode_kernels::routed_lora_backward", _backward_grads,
                                                mutates_args=())


@_routed_lora_backward.register_fake
def _(grad_y, x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight, saved_rank,
      saved_gates, experts_per_modality, scaling, backend, needs):
    like = RoutedLoraGrads(x=x, lora_input=lora_input, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                           router_weight=router_weight)
    return _flat_grads(RoutedLoraGrads(*(torch.empty_like(t) if n else None for t, n in zip(like, needs))), x)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
     experts_per_modality, scaling, backend) = inputs
    _, saved_rank, saved_gates = output
    ctx.mark_non_differentiable(saved_rank, saved_gates)
    ctx.set_materialize_grads(False)  # no zero gradients allocated for the saved outputs
    ctx.save_for_backward(x, weight, bias, lora_input, order, offsets, modality, lora_a, lora_b, router_weight,
                          saved_rank, saved_gates)
    ctx.meta = (list(experts_per_modality), scaling, backend)


def _backward(ctx, grad_y, _grad_rank, _grad_gates):
    if grad_y is None:  # y did not reach the loss (gradients are not materialised)
        return _INPUT_GRADS.returns()
    needs = RoutedLoraNeeds._make(_INPUT_GRADS.needs(ctx.needs_input_grad))
    grads = call(_routed_lora_backward, _backward_grads, grad_y, *ctx.saved_tensors, *ctx.meta, list(needs))
    return _INPUT_GRADS.returns(_typed_grads(grads, needs))


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
    options = check_routed_lora(x, weight, bias, lora_a, lora_b, router_weight, experts_per_modality, scaling,
                                lora_input)
    plan = routing_plan_for(modality, x, len(options.experts_per_modality))
    resolved = backends.resolve(backend, x.device, "routed_lora")
    # Skipped when already flat: a no-op reshape still costs a few microseconds a call.
    x2 = x if x.dim() == 2 else x.reshape(plan.num_tokens, x.shape[-1])
    u2 = None if lora_input is None else lora_input.reshape(x2.shape)
    y, _, _ = call_differentiable(_routed_lora, _RoutedLora, x2, weight, bias, u2, plan.order, plan.offsets,
                                  plan.modality, lora_a, lora_b, router_weight, list(options.experts_per_modality),
                                  options.scaling, resolved)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
