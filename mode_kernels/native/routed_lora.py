"""Native CPU routed LoRA: the backend interface of mode_kernels.reference.routed_lora over csrc/.

The forward also returns its shrink [S | L]^T (the adapters' rank-r products and router logits, rank-major:
[E*r (+ E), T]), which the backward reuses instead of recomputing it (``RoutedLoraSaved.rank``; ``gates`` is empty).
"""
from __future__ import annotations

import torch

from ..contract import RoutedLoraGrads, RoutedLoraNeeds, RoutedLoraOptions, RoutedLoraSaved
from ..routing import RoutingPlan
from .build import extension


def saved_like(x, lora_a, router_weight, options: RoutedLoraOptions) -> RoutedLoraSaved:
    """Empty tensors shaped like what the forward keeps for the backward: for fake tensors."""
    experts = sum(options.experts_per_modality)
    rows = experts * lora_a.shape[1] + (experts if router_weight is not None else 0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return RoutedLoraSaved(x.new_empty(rows, x.shape[0], dtype=acc), x.new_empty(0))


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        options: RoutedLoraOptions) -> tuple[torch.Tensor, RoutedLoraSaved]:
    y, shrink = extension().routed_lora_forward(x, weight, bias, lora_input, plan.order, plan.offsets, lora_a,
                                                lora_b, router_weight, list(options.experts_per_modality),
                                                float(options.scaling))
    return y, RoutedLoraSaved(shrink, x.new_empty(0))


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                         options: RoutedLoraOptions, needs: RoutedLoraNeeds,
                         saved: RoutedLoraSaved | None = None) -> RoutedLoraGrads:
    """``saved``: the forward's (its shrink recomputed when not given)."""
    return RoutedLoraGrads(*extension().routed_lora_backward(
        grad_y, x, weight, bias, lora_input, plan.order, plan.offsets, lora_a, lora_b, router_weight,
        list(options.experts_per_modality), float(options.scaling), [bool(n) for n in needs],
        None if saved is None else saved.rank))
