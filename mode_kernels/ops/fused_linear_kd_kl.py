"""fused_linear_kd_kl_loss: the KD loss of two output projections without materialising logits."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .._validation import check_fused_linear_kd_kl
from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, kd_options
from ._dispatch import InputGrads, autograd_function, call, call_differentiable
from .kd_kl import loss_dtype, reduce_rows


def _flat_grads(result: FusedLinearKdKlResult, ws: Tensor) -> tuple[Tensor, Tensor]:
    """(d hs, d ws) for a custom op, which cannot return None: an absent gradient travels as an empty tensor."""
    return tuple(ws.new_empty(0) if g is None else g for g in (result.d_hidden, result.d_weight))


def _fake_grads(hs, ws, need_dh, need_dw):
    return _flat_grads(FusedLinearKdKlResult(None, torch.empty_like(hs) if need_dh else None,
                                             torch.empty_like(ws) if need_dw else None), ws)


def _run(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend, row_weight, need_dh, need_dw):
    """The backend's ``fused_linear_kd_kl`` from the custom ops' flat arguments."""
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    return impl.fused_linear_kd_kl(hs, ht, ws, wt, mask, kd_options(temperature, lo, hi, topk), row_weight,
                                   FusedLinearKdKlNeeds(need_dh, need_dw))


# reduction "mean" / "sum": the gradients are computed in the forward pass (no recompute); the
# backward only scales them by the output's gradient.
def _reduced_forward(hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                     row_weight: Tensor, temperature: float, lo: int, hi: int, topk: int | None,
                     backend: str, need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    result = _run(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend, row_weight, need_dh, need_dw)
    return ((result.loss * row_weight).sum(), *_flat_grads(result, ws))


_REDUCED_GRADS = InputGrads(_reduced_forward, ("hs", "ws"))
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
    if grad_loss is None:  # the loss did not reach the output (gradients are not materialised)
        return _REDUCED_GRADS.returns()
    return _REDUCED_GRADS.returns(((d_hs * grad_loss).to(d_hs.dtype) if need_dh else None,
                                   (d_ws * grad_loss).to(d_ws.dtype) if need_dw else None))


_fused_linear_kd_kl_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)
_FusedLinearKdKlReduced = autograd_function(_reduced_forward, _reduced_setup, _reduced_backward)


# reduction "none": the forward computes the losses only; the backward recomputes the logits with
# the output's gradient as row weights.
def _rows_forward(hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                  temperature: float, lo: int, hi: int, topk: int | None, backend: str) -> Tensor:
    return _run(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend, None, False, False).loss


_ROWS_GRADS = InputGrads(_rows_forward, ("hs", "ws"))
_fused_linear_kd_kl_rows = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_rows", _rows_forward,
                                                   mutates_args=())


@_fused_linear_kd_kl_rows.register_fake
def _(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend):
    return hs.new_empty(hs.shape[0], dtype=loss_dtype(hs))


def _rows_backward_grads(grad_rows: Tensor, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None,
                         mask: Tensor | None, temperature: float, lo: int, hi: int, topk: int | None,
                         backend: str, need_dw: bool) -> tuple[Tensor, Tensor]:
    result = _run(hs, ht, ws, wt, mask, temperature, lo, hi, topk, backend, grad_rows.contiguous(), True, need_dw)
    return _flat_grads(result, ws)


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
    need_dw = _ROWS_GRADS.needs(ctx.needs_input_grad)[1]
    d_hs, d_ws = call(_fused_linear_kd_kl_rows_backward, _rows_backward_grads, grad_rows, hs, ht, ws, wt, mask,
                      *ctx.meta, need_dw)
    return _ROWS_GRADS.returns((d_hs, d_ws if need_dw else None))


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
    options, reduction, mask = check_fused_linear_kd_kl(student_hidden, teacher_hidden, weight, teacher_weight,
                                                        temperature, vocab_range, topk, reduction, mask)
    resolved = backends.resolve(backend, student_hidden.device, "fused_linear_kd_kl")
    hidden = student_hidden.shape[-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    hs = student_hidden.reshape(-1, hidden)
    args = (teacher_hidden.detach().reshape(-1, hidden), weight,
            None if teacher_weight is None else teacher_weight.detach(), flat_mask)
    flat_options = (options.temperature, options.lo, options.hi, options.topk, resolved)
    if reduction == "none":
        loss_rows = call_differentiable(_fused_linear_kd_kl_rows, _FusedLinearKdKlRows, hs, *args, *flat_options)
        return reduce_rows(loss_rows, flat_mask, reduction, tuple(student_hidden.shape[:-1]))
    grad = torch.is_grad_enabled()
    row_weight = row_weights(hs.shape[0], flat_mask, reduction, loss_dtype(hs), hs.device)
    loss, _, _ = call_differentiable(_fused_linear_kd_kl_reduced, _FusedLinearKdKlReduced, hs, *args, row_weight,
                                     *flat_options, grad and student_hidden.requires_grad,
                                     grad and weight.requires_grad)
    return loss
