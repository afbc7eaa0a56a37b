"""Native CPU routed LoRA: the backend interface of mode_kernels.reference.routed_lora over csrc/.

The forward also returns its shrink [S | L]^T (the adapters' rank-r products and router logits, rank-major:
[E*r (+ E), T]), which the backward reuses instead of recomputing it (``saved``: the op layer's pair of saved
tensors, the second empty).
"""
from __future__ import annotations

import torch

from ..routing import RoutingPlan
from .build import extension


def saved_like(x, lora_a, router_weight, experts_per_modality):
    """Empty tensors shaped like what the forward keeps for the backward: for fake tensors."""
    experts = sum(experts_per_modality)
    rows = experts * lora_a.shape[1] + (experts if router_weight is not None else 0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(rows, x.shape[0], dtype=acc), x.new_empty(0)


def routed_lora_forward_saving(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                               experts_per_modality, scaling):
    y, shrink = extension().routed_lora_forward(x, weight, bias, lora_input, plan.order, plan.offsets, lora_a,
                                                lora_b, router_weight, list(experts_per_modality), float(scaling))
    return y, (shrink, x.new_empty(0))


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        experts_per_modality, scaling):
    return routed_lora_forward_saving(x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight,
                                      experts_per_modality, scaling)[0]


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                         experts_per_modality, scaling, needs, saved=None):
    """``saved``: the forward's saved pair (recomputed when not given)."""
    return tuple(extension().routed_lora_backward(grad_y, x, weight, bias, lora_input, plan.order, plan.offsets,
                                                  lora_a, lora_b, router_weight, list(experts_per_modality),
                                                  float(scaling), [bool(n) for n in needs],
                                                  None if saved is None else saved[0]))
