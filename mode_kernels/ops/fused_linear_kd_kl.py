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
    check_topk,
    check_vocab_range,
)
from ._dispatch import autograd_function, call, call_differentiable
from .kd_kl import loss_dtype, reduce_rows


def _grads_or_empty(ws: Tensor, d_hs: Tensor | None, d_ws: Tensor | None) -> tuple[Tensor, Tensor]:
    """Custom ops return tensors: an absent gradient travels as an empty one."""
    return (d_hs if d_hs is not None else ws.new_empty(0)), (d_ws if d_ws is not None else ws.new_empty(0))


def _fake_grads(hs, ws, need_dh, need_dw):
    return torch.empty_like(hs) if need_dh else ws.new_empty(0), torch.empty_like(ws) if need_dw else ws.new_empty(0)


# reduction "mean" / "sum": the gradients are computed in the forward pass (no recompute); the
# backward only scales them by the output's gradient.
def _reduced_forward(hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                     row_weight: Tensor, temperature: float, lo: int, hi: int, topk: int | None,
                     backend: str, need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    loss_rows, d_hs, d_ws = impl.fused_linear_kd_kl(hs, ht, ws, wt, mask, temperature, lo, hi, topk,
                                                    row_weight, need_dh, need_dw)
    return ((loss_rows * row_weight).sum(), *_grads_or_empty(ws, d_hs, d_ws))


_fused_linear_kd_kl_reduced = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_reduced", _reduced_forward,
                                                      mutates_args=())


@_fused_linear_kd_kl_reduced.register_fake
def _(hs, ht, ws, wt, mask, row_weight, temperature, lo, hi, topk, backend, need_dh, need_dw):
    return (hs.new_empty((), dtype=loss_dtype(hs)), *_fake_grads(hs, ws, need_dh, need_dw))


def _reduced_setup(ctx, inputs, output):
    ctx.need = inputs[-2:]
    ctx.mark_non_differentiable(*output[1:])
    # No zero gradients allocated for the returned gradients (each as large as hs or ws) in the backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _reduced_backward(ctx, grad_loss, _grad_d_hs, _grad_d_ws):
    d_hs, d_ws = ctx.saved_tensors
    need_dh, need_dw = ctx.need
    grads = [None] * 13
    if grad_loss is None:  # the loss did not reach the output (gradients are not materialised)
        return tuple(grads)
    if need_dh:
        grads[0] = (d_hs * grad_loss).to(d_hs.dtype)
    if need_dw:
        grads[2] = (d_ws * grad_loss).to(d_ws.dtype)
    return tuple(grads)


_fused_linear_kd_kl_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)
_FusedLinearKdKlReduced = autograd_function(_reduced_forward, _reduced_setup, _reduced_backward)


# reduction "none": the forward computes the losses only; the backward recomputes the logits with
# the output's gradient as row weights.
def _rows_forward(hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                  temperature: float, lo: int, hi: int, topk: int | None, backend: str) -> Tensor:
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    return impl.fused_linear_kd_kl(hs, ht, ws, wt, mask, temperature, lo, hi, topk, None, False, False)[0]


_fused_linear_kd_kl_rows = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_rows", _rows_forward,
                                                   mutates_args=())


@_fused_linear_kd_kl_rows.register_fake
def _(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend):
    return hs.new_empty(hs.shape[0], dtype=loss_dtype(hs))


def _rows_backward_grads(grad_rows: Tensor, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None,
                         mask: Tensor | None, temperature: float, lo: int, hi: int, topk: int | None,
                         backend: str, need_dw: bool) -> tuple[Tensor, Tensor]:
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    _, d_hs, d_ws = impl.fused_linear_kd_kl(hs, ht, ws, wt, mask, temperature, lo, hi, topk,
                                            grad_rows.contiguous(), True, need_dw)
    return _grads_or_empty(ws, d_hs, d_ws)


_fused_linear_kd_kl_rows_backward = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_rows_backward",
                                                            _rows_backward_grads, mutates_args=())


@_fused_linear_kd_kl_rows_backward.register_fake
def _(grad_rows, hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend, need_dw):
    return _fake_grads(hs, ws, True, need_dw)


def _rows_setup(ctx, inputs, output):
    hs, ht, ws, wt, mask, *meta = inputs
    ctx.save_for_backward(hs, ht, ws, wt, mask)
    ctx.meta = tuple(meta)


def _rows_backward(ctx, grad_rows):
    hs, ht, ws, wt, mask = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    d_hs, d_ws = call(_fused_linear_kd_kl_rows_backward, _rows_backward_grads, grad_rows, hs, ht, ws, wt, mask,
                      *ctx.meta, need_dw)
    return d_hs, None, d_ws if need_dw else None, None, None, None, None, None, None, None


_fused_linear_kd_kl_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
_FusedLinearKdKlRows = autograd_function(_rows_forward, _rows_setup, _rows_backward)


def row_weights(rows: int, mask: Tensor | None, reduction: str, dtype: torch.dtype, device) -> Tensor:
    """The weight of each position's loss in a "mean" or "sum" reduction, with no host sync."""
    weight = torch.ones(rows, dtype=dtype, device=device) if mask is None else mask.to(dtype)
    if reduction == "sum":
        return weight
    return weight / (max(rows, 1) if mask is None else mask.sum().clamp(min=1).to(dtype))


def fused_linear_kd_kl_loss(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, *,
                            teacher_weight: Tensor | None = None, temperature: float = 1.0,
                            mask: Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                            topk: int | None = None, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``kd_kl_loss(student_hidden @ weight.T, teacher_hidden @ (teacher_weight or weight).T, ...)``
    computed without ever holding the [positions, V] logits.

    Args:
        student_hidden, teacher_hidden: [..., H], same shape.
        weight: [V, H], the student's output projection (lm_head). teacher_weight: [V, H] or None
            (the teacher uses ``weight``).
        temperature, mask, vocab_range, topk, reduction, backend: as in ``kd_kl_loss``.
    Gradients flow to student_hidden, and to weight when it requires grad, through the student's
    logits only: the teacher (hidden states and weight) is a constant.

    With reduction "mean" or "sum" the gradients are computed during the forward pass, chunk by
    chunk of positions (both logits, then d hidden from the d logits: three GEMM-sized products
    with a frozen weight, none recomputed), and kept until the backward, which only scales them;
    "none" recomputes the logits in the backward. Extra memory: a chunk of positions sized to
    ``mode_kernels.kd_memory`` (a tenth of the naive path's floor), plus, with a trainable 16-bit
    weight, a float32 [hi - lo, H] gradient accumulator.
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

    topk = check_topk(topk, hi - lo)

    flat_mask = None if mask is None else mask.reshape(-1)
    hs = student_hidden.reshape(-1, hidden)
    args = (teacher_hidden.detach().reshape(-1, hidden), weight,
            None if teacher_weight is None else teacher_weight.detach(), flat_mask)
    if reduction == "none":
        loss_rows = call_differentiable(_fused_linear_kd_kl_rows, _FusedLinearKdKlRows, hs, *args, temperature, lo,
                                        hi, topk, resolved)
        return reduce_rows(loss_rows, flat_mask, reduction, lead)
    grad = torch.is_grad_enabled()
    row_weight = row_weights(hs.shape[0], flat_mask, reduction, loss_dtype(hs), hs.device)
    loss, _, _ = call_differentiable(_fused_linear_kd_kl_reduced, _FusedLinearKdKlReduced, hs, *args, row_weight,
                                     temperature, lo, hi, topk, resolved, grad and student_hidden.requires_grad,
                                     grad and weight.requires_grad)
    return loss
