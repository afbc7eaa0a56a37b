"""mode-kernels: fused kernels for Modality-Decoupled Experts (MoDE).

    import mode_kernels as mk
    plan = mk.plan_routing(modality_ids, num_modalities=2)
    y = mk.modality_lora_linear(x, W, b, plan, A, B, R, experts_per_modality=(4, 1), scaling=2.0)
    loss = mk.kd_kl_loss(student_logits, teacher_logits, temperature=2.0)
    loss = mk.fused_linear_kd_kl_loss(student_hidden, teacher_hidden, lm_head_weight, temperature=2.0)
    top = mk.teacher_topk(teacher_hidden, lm_head_weight, 256)          # once, e.g. cached
    loss = mk.fused_linear_kd_kl_loss(student_hidden, None, lm_head_weight, teacher_topk=top, temperature=2.0)

Importing this package does not import triton: on machines without it the torch backend serves.
"""
from ._validation import set_sync_checks
from .backends import BACKENDS, triton_available
from .contract import TeacherTopk
from .ops import fused_linear_kd_kl_loss, kd_kl_loss, modality_lora_linear, teacher_topk
from .routing import RoutingPlan, plan_routing

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "RoutingPlan",
    "TeacherTopk",
    "fused_linear_kd_kl_loss",
    "kd_kl_loss",
    "modality_lora_linear",
    "plan_routing",
    "set_sync_checks",
    "teacher_topk",
    "triton_available",
]
