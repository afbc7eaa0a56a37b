"""fused_linear_kd_kl_loss: the KD loss of two output projections without materialising logits."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .._validation import (
    check_float,
    check_mask,
    check_reduction,
    check_same_device,
    check_temperature,
    check_vocab_range,
)
from .kd_kl import loss_dtype, reduce_rows


@torch.library.custom_op("mode_kernels::fused_linear_kd_kl", mutates_args=())
def _fused_linear_kd_kl(hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                        temperature: float, lo: int, hi: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    return impl.fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi)


@_fused_linear_kd_kl.register_fake
def _(hs, ht, ws, wt, mask, temperature, lo, hi, backend):
    rows = hs.new_empty(hs.shape[0], dtype=loss_dtype(hs))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op("mode_kernels::fused_linear_kd_kl_backward", mutates_args=())
def _fused_linear_kd_kl_backward(grad_rows: Tensor, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None,
                                 mask: Tensor | None, lse_s: Tensor, lse_t: Tensor, temperature: float, lo: int,
                                 hi: int, backend: str, need_dw: bool) -> tuple[Tensor, Tensor]:
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    d_hs, d_ws = impl.fused_linear_kd_kl_backward(grad_rows.contiguous(), hs, ht, ws, wt, mask, lse_s, lse_t,
                                                  temperature, lo, hi, need_dw)
    return d_hs, d_ws if d_ws is not None else ws.new_empty(0)


@_fused_linear_kd_kl_backward.register_fake
def _(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t, temperature, lo, hi, backend, need_dw):
    return torch.empty_like(hs), torch.empty_like(ws) if need_dw else ws.new_empty(0)


def _setup(ctx, inputs, output):
    hs, ht, ws, wt, mask, temperature, lo, hi, backend = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(hs, ht, ws, wt, mask, lse_s, lse_t)
    ctx.meta = (temperature, lo, hi, backend)


def _backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t):
    hs, ht, ws, wt, mask, lse_s, lse_t = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    d_hs, d_ws = _fused_linear_kd_kl_backward(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t, *ctx.meta, need_dw)
    return d_hs, None, d_ws if need_dw else None, None, None, None, None, None, None


_fused_linear_kd_kl.register_autograd(_backward, setup_context=_setup)


def fused_linear_kd_kl_loss(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, *,
                            teacher_weight: Tensor | None = None, temperature: float = 1.0,
                            mask: Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                            reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``kd_kl_loss(student_hidden @ weight.T, teacher_hidden @ (teacher_weight or weight).T, ...)``
    computed without ever holding the [positions, V] logits.

    Args:
        student_hidden, teacher_hidden: [..., H], same shape.
        weight: [V, H], the student's output projection (lm_head). teacher_weight: [V, H] or None
            (the teacher uses ``weight``).
        temperature, mask, vocab_range, reduction, backend: as in ``kd_kl_loss``.
    Gradients flow to student_hidden, and to weight when it requires grad, through the student's
    logits only: the teacher (hidden states and weight) is a constant.
    """
    check_float(student_hidden, "student_hidden")
    check_float(teacher_hidden, "teacher_hidden")
    check_float(weight, "weight")
    if student_hidden.dim() < 1:
        raise ValueError("student_hidden: expected shape [..., H], got a scalar")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden: expected shape {list(student_hidden.shape)} (that of student_hidden), "
                         f"got {list(teacher_hidden.shape)}")
    hidden = student_hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"weight: expected shape [V, {hidden}] (H = student_hidden.shape[-1]), "
                         f"got {list(weight.shape)}")
    if teacher_weight is not None:
        check_float(teacher_weight, "teacher_weight")
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight: expected shape {list(weight.shape)} (that of weight), "
                             f"got {list(teacher_weight.shape)}")
    check_same_device(student_hidden, "student_hidden", teacher_hidden=teacher_hidden, weight=weight,
                      teacher_weight=teacher_weight)
    temperature = check_temperature(temperature)
    reduction = check_reduction(reduction)
    lo, hi = check_vocab_range(vocab_range, weight.shape[0])
    lead = tuple(student_hidden.shape[:-1])
    mask = check_mask(mask, lead, student_hidden)
    resolved = backends.resolve(backend, student_hidden.device, "fused_linear_kd_kl")

    flat_mask = None if mask is None else mask.reshape(-1)
    loss_rows, _, _ = _fused_linear_kd_kl(
        student_hidden.reshape(-1, hidden), teacher_hidden.detach().reshape(-1, hidden), weight,
        None if teacher_weight is None else teacher_weight.detach(), flat_mask, temperature, lo, hi, resolved)
    return reduce_rows(loss_rows, flat_mask, reduction, lead)
