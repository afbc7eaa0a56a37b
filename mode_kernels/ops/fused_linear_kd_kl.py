"""fused_linear_kd_kl_loss: the KD loss of two output projections without materialising logits."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, kd_cost
from .._validation import check_fused_linear_kd_kl, check_teacher_topk_args
from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, TeacherTopk, kd_options
from ._dispatch import InputGrads, autograd_function, call, call_differentiable
from .kd_kl import loss_dtype, reduce_rows


def _flat_grads(result: FusedLinearKdKlResult, ws: Tensor) -> tuple[Tensor, Tensor]:
    """(d hs, d ws) for a custom op, which cannot return None: an absent gradient travels as an empty tensor."""
    return tuple(ws.new_empty(0) if g is None else g for g in (result.d_hidden, result.d_weight))


def _fake_grads(hs, ws, need_dh, need_dw):
    return _flat_grads(FusedLinearKdKlResult(None, torch.empty_like(hs) if need_dh else None,
                                             torch.empty_like(ws) if need_dw else None), ws)


def _run(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend, row_weight,
         need_dh, need_dw):
    """The backend's loss from the custom ops' flat arguments: the teacher given as its top k (t_ids, t_logits,
    t_lse), or as hidden states ht and weight wt (None: ws). With topk, the student's logits come from dense
    tiles or from gathered weight rows as ``kd_cost.topk_strategy`` decides (the tail bucket always takes the
    teacher's selection then the given form)."""
    impl = backends.implementation(backend, "fused_linear_kd_kl")
    options = kd_options(temperature, lo, hi, topk, topk_tail)
    needs = FusedLinearKdKlNeeds(need_dh, need_dw)
    if t_ids is not None:
        teacher = TeacherTopk(t_ids, t_logits, t_lse)
    elif topk is not None and (topk_tail or kd_cost.topk_strategy(backend, hs.shape[0], hs.shape[1], hi - lo,
                                                                  topk, need_dw) == "sparse"):
        teacher = impl.teacher_topk(ht, ws if wt is None else wt, options, topk_tail)
    else:
        return impl.fused_linear_kd_kl(hs, ht, ws, wt, mask, options, row_weight, needs)
    return impl.fused_linear_kd_kl_given(hs, teacher, ws, mask, options, row_weight, needs)


# reduction "mean" / "sum": the gradients are computed in the forward pass (no recompute); the
# backward only scales them by the output's gradient.
def _reduced_forward(hs: Tensor, ht: Tensor | None, ws: Tensor, wt: Tensor | None, t_ids: Tensor | None,
                     t_logits: Tensor | None, t_lse: Tensor | None, mask: Tensor | None, row_weight: Tensor,
                     temperature: float, lo: int, hi: int, topk: int | None, topk_tail: bool, backend: str,
                     need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    result = _run(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend,
                  row_weight, need_dh, need_dw)
    return ((result.loss * row_weight).sum(), *_flat_grads(result, ws))


_REDUCED_GRADS = InputGrads(_reduced_forward, ("hs", "ws"))
_fused_linear_kd_kl_reduced = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_reduced", _reduced_forward,
                                                      mutates_args=())


@_fused_linear_kd_kl_reduced.register_fake
def _(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, row_weight, temperature, lo, hi, topk, topk_tail, backend,
      need_dh, need_dw):
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
def _rows_forward(hs: Tensor, ht: Tensor | None, ws: Tensor, wt: Tensor | None, t_ids: Tensor | None,
                  t_logits: Tensor | None, t_lse: Tensor | None, mask: Tensor | None, temperature: float, lo: int,
                  hi: int, topk: int | None, topk_tail: bool, backend: str) -> Tensor:
    return _run(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend, None,
                False, False).loss


_ROWS_GRADS = InputGrads(_rows_forward, ("hs", "ws"))
_fused_linear_kd_kl_rows = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_rows", _rows_forward,
                                                   mutates_args=())


@_fused_linear_kd_kl_rows.register_fake
def _(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend):
    return hs.new_empty(hs.shape[0], dtype=loss_dtype(hs))


def _rows_backward_grads(grad_rows: Tensor, hs: Tensor, ht: Tensor | None, ws: Tensor, wt: Tensor | None,
                         t_ids: Tensor | None, t_logits: Tensor | None, t_lse: Tensor | None, mask: Tensor | None,
                         temperature: float, lo: int, hi: int, topk: int | None, topk_tail: bool, backend: str,
                         need_dw: bool) -> tuple[Tensor, Tensor]:
    result = _run(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend,
                  grad_rows.contiguous(), True, need_dw)
    return _flat_grads(result, ws)


_fused_linear_kd_kl_rows_backward = torch.library.custom_op("mode_kernels::fused_linear_kd_kl_rows_backward",
                                                            _rows_backward_grads, mutates_args=())


@_fused_linear_kd_kl_rows_backward.register_fake
def _(grad_rows, hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, temperature, lo, hi, topk, topk_tail, backend,
      need_dw):
    return _fake_grads(hs, ws, True, need_dw)


def _rows_setup(ctx, inputs, output):
    hs, ht, ws, wt, t_ids, t_logits, t_lse, mask, *meta = inputs
    ctx.save_for_backward(hs, ht, ws, wt, t_ids, t_logits, t_lse, mask)
    ctx.meta = tuple(meta)


def _rows_backward(ctx, grad_rows):
    need_dw = _ROWS_GRADS.needs(ctx.needs_input_grad)[1]
    d_hs, d_ws = call(_fused_linear_kd_kl_rows_backward, _rows_backward_grads, grad_rows, *ctx.saved_tensors,
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


def fused_linear_kd_kl_loss(student_hidden: Tensor, teacher_hidden: Tensor | None, weight: Tensor, *,
                            teacher_weight: Tensor | None = None, teacher_topk: TeacherTopk | None = None,
                            temperature: float = 1.0, mask: Tensor | None = None,
                            vocab_range: tuple[int, int] | None = None, topk: int | None = None,
                            topk_tail: bool = False, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``kd_kl_loss(student_hidden @ weight.T, teacher_hidden @ (teacher_weight or weight).T, ...)``
    computed without ever holding the [positions, V] logits.

    Args:
        student_hidden: [..., H].
        teacher_hidden: [..., H], the shape of student_hidden (None with ``teacher_topk``).
        weight: [V, H], the student's output projection (lm_head).
        teacher_weight: [V, H] or None (the teacher uses ``weight``).
        teacher_topk: the teacher given as its top k instead (``mode_kernels.TeacherTopk``: ids [..., k] in the
            vocab slice, logits [..., k], e.g. from ``teacher_topk`` once and cached); teacher_hidden and
            teacher_weight are then None, and ``topk`` None or k.
        topk: only the teacher's k largest logits in the slice count, both distributions renormalised on them
            (ties at the k-th: the lower ids, ``mode_kernels.contract.TIES_RULE``).
        topk_tail: the mass outside the teacher's k is one more outcome of both distributions (needs topk, or
            a teacher_topk with its ``logsumexp``); it needs the student's whole slice, so that path is dense.
        temperature: as in ``kd_kl_loss``.
        mask: as in ``kd_kl_loss``.
        vocab_range: as in ``kd_kl_loss``.
        reduction: as in ``kd_kl_loss``.
        backend: as in ``kd_kl_loss``.

    Gradients flow to student_hidden, and to weight when it requires grad, through the student's
    logits only: the teacher is a constant.

    With reduction "mean" or "sum" the gradients are computed during the forward pass, chunk by
    chunk of positions (both logits, then d hidden from the d logits: three GEMM-sized products
    with a frozen weight, none recomputed), and kept until the backward, which only scales them;
    "none" recomputes the logits in the backward. Extra memory: a chunk of positions sized to
    ``mode_kernels.kd_memory`` (a tenth of the naive path's floor), plus, with a trainable 16-bit
    weight, a float32 [hi - lo, H] gradient accumulator. With top k, where gathering the weight's rows beats
    the dense tiles (``mode_kernels.kd_cost``: the native backend on CPU), the student's logits are computed at
    the teacher's k ids only.
    """
    options, reduction, mask = check_fused_linear_kd_kl(student_hidden, teacher_hidden, weight, teacher_weight,
                                                        teacher_topk, temperature, vocab_range, topk, topk_tail,
                                                        reduction, mask)
    resolved = backends.resolve(backend, student_hidden.device, "fused_linear_kd_kl")
    hidden = student_hidden.shape[-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    hs = student_hidden.reshape(-1, hidden)
    if teacher_topk is None:
        teacher = (teacher_hidden.detach().reshape(-1, hidden), weight,
                   None if teacher_weight is None else teacher_weight.detach(), None, None, None)
    else:
        ids, logits, lse = teacher_topk
        k = ids.shape[-1]
        teacher = (None, weight, None, ids.reshape(-1, k).to(torch.int64), logits.detach().reshape(-1, k),
                   None if lse is None else lse.detach().reshape(-1))
    args = (*teacher, flat_mask)
    flat_options = (options.temperature, options.lo, options.hi, options.topk, options.topk_tail, resolved)
    if reduction == "none":
        loss_rows = call_differentiable(_fused_linear_kd_kl_rows, _FusedLinearKdKlRows, hs, *args, *flat_options)
        return reduce_rows(loss_rows, flat_mask, reduction, tuple(student_hidden.shape[:-1]))
    grad = torch.is_grad_enabled()
    row_weight = row_weights(hs.shape[0], flat_mask, reduction, loss_dtype(hs), hs.device)
    loss, _, _ = call_differentiable(_fused_linear_kd_kl_reduced, _FusedLinearKdKlReduced, hs, *args, row_weight,
                                     *flat_options, grad and student_hidden.requires_grad,
                                     grad and weight.requires_grad)
    return loss


def teacher_topk(teacher_hidden: Tensor, weight: Tensor, k: int, *, vocab_range: tuple[int, int] | None = None,
                 temperature: float = 1.0, logsumexp: bool = False, backend: str = "auto") -> TeacherTopk:
    """The teacher's k largest logits of ``teacher_hidden @ weight.T`` in the vocab slice, per position, without
    holding the [positions, V] logits (chunks of positions): a ``TeacherTopk`` for ``fused_linear_kd_kl_loss``.

    ids int64 [..., k], ascending within a position; ties at the k-th largest: the lower ids
    (``mode_kernels.contract.TIES_RULE``); logits float32 (float64 for float64 inputs), masked entries -inf; with
    ``logsumexp`` also the slice's logsumexp of logits / temperature [...] (what ``topk_tail`` needs). No
    gradient. Cost: one GEMM of the slice per chunk plus the selection (the native backend: nth_element per
    position; torch: torch.topk on int64 keys; Triton: inside its GEMM for k up to 256, else as torch)."""
    options = check_teacher_topk_args(teacher_hidden, weight, k, vocab_range, temperature)
    resolved = backends.resolve(backend, teacher_hidden.device, "fused_linear_kd_kl")
    lead = tuple(teacher_hidden.shape[:-1])
    with torch.no_grad():
        ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        ids, logits, lse = backends.implementation(resolved, "fused_linear_kd_kl").teacher_topk(
            ht, weight.detach(), options, logsumexp)
    return TeacherTopk(ids.reshape(*lead, options.topk), logits.reshape(*lead, options.topk),
                       None if lse is None else lse.reshape(lead))
