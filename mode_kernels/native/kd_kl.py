"""Native CPU KD loss: the backend interface of mode_kernels.reference.kd_kl over csrc/.

Both the logits form and the fused-linear form live here, as in the reference module.
"""
from __future__ import annotations

from .build import extension


def kd_kl_forward(student, teacher, mask, temperature, lo, hi):
    return tuple(extension().kd_kl_forward(student, teacher, mask, float(temperature), lo, hi))


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, temperature, lo, hi):
    return extension().kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, float(temperature), lo, hi)


def fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi, topk=None, grad_rows=None):
    """(loss, lse_s, lse_t) as the reference; with ``grad_rows`` also d hs for those row gradients."""
    loss, lse_s, lse_t, d_hs = extension().fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, float(temperature), lo,
                                                                     hi, topk or 0, grad_rows)
    return (loss, lse_s, lse_t) if grad_rows is None else (loss, lse_s, lse_t, d_hs)


def fused_linear_kd_kl_backward(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t, temperature, lo, hi, need_dw,
                                topk=None):
    d_hs, d_ws = extension().fused_linear_kd_kl_backward(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t,
                                                         float(temperature), lo, hi, topk or 0, need_dw)
    return d_hs, d_ws
