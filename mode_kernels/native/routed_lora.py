"""Native CPU routed LoRA: the backend interface of mode_kernels.reference.routed_lora over csrc/."""
from __future__ import annotations

from ..routing import RoutingPlan
from .build import extension


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        experts_per_modality, scaling):
    return extension().routed_lora_forward(x, weight, bias, lora_input, plan.order, plan.offsets, lora_a, lora_b,
                                           router_weight, list(experts_per_modality), float(scaling))


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                         experts_per_modality, scaling, needs):
    return tuple(extension().routed_lora_backward(grad_y, x, weight, bias, lora_input, plan.order, plan.offsets,
                                                  lora_a, lora_b, router_weight, list(experts_per_modality),
                                                  float(scaling), [bool(n) for n in needs]))
