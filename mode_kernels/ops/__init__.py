"""The ops: each a torch custom op (forward and backward; skipped in plain eager mode, see _dispatch) with a thin
functional API."""
from .fused_linear_kd_kl import fused_linear_kd_kl_loss, teacher_topk
from .kd_kl import kd_kl_loss
from .routed_lora import modality_lora_linear

__all__ = ["fused_linear_kd_kl_loss", "kd_kl_loss", "modality_lora_linear", "teacher_topk"]
