"""Native CPU KD loss: the backend interface of mode_kernels.reference.kd_kl over csrc/.

Both the logits form and the fused-linear form live here, as in the reference module.
"""
from __future__ import annotations

from .. import kd_cost, reference
from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, KdKlRows, KdOptions, TeacherTopk
from .build import extension


def kd_kl_forward(student, teacher, mask, options: KdOptions) -> KdKlRows:
    return KdKlRows(*extension().kd_kl_forward(student, teacher, mask, float(options.temperature), options.lo,
                                               options.hi))


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, options: KdOptions):
    return extension().kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, float(options.temperature),
                                      options.lo, options.hi)


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


def fused_linear_kd_kl(hs, ht, ws, wt, mask, options: KdOptions, row_weight,
                       needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The backend interface of ``mode_kernels.reference.kd_kl.fused_linear_kd_kl``: the loss per
    position and, when asked, the gradients of sum_p row_weight[p] * loss[p]. d hs alone comes
    from the forward pass itself (its row gradients are known up front); d ws needs the backward
    pass over the saved log-sum-exps."""
    temperature, lo, hi, topk = options.temperature, options.lo, options.hi, options.topk
    if row_weight is None or not (needs.hidden or needs.weight):
        return FusedLinearKdKlResult(fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi, topk)[0],
                                     None, None)
    if not needs.weight:
        loss, _, _, d_hs = fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi, topk,
                                                      grad_rows=row_weight)
        return FusedLinearKdKlResult(loss, d_hs, None)
    loss, lse_s, lse_t = fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi, topk)
    d_hs, d_ws = fused_linear_kd_kl_backward(row_weight, hs, ht, ws, wt, mask, lse_s, lse_t, temperature, lo, hi,
                                             True, topk)
    return FusedLinearKdKlResult(loss, d_hs if needs.hidden else None, d_ws)


def teacher_topk(ht, wt, options: KdOptions, logsumexp: bool) -> TeacherTopk:
    """The teacher's top k per position (csrc/kd_topk.cpp: nth_element per position, chunk by chunk)."""
    values, index, lse = extension().kd_teacher_topk(ht, wt, options.lo, options.hi, options.topk,
                                                     float(options.temperature), logsumexp)
    return TeacherTopk(index, values, lse if logsumexp else None)


def fused_linear_kd_kl_given(hs, teacher: TeacherTopk, ws, mask, options: KdOptions, row_weight,
                             needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The given-teacher form: the sparse student of csrc/kd_topk.cpp (the weight's rows gathered at the ids)
    where ``kd_cost.topk_strategy`` says it pays, else the dense tiles (the reference's chunks of ATen GEMMs,
    which is what a native dense loop would run). The tail bucket needs the student's whole slice: dense."""
    if options.topk_tail or kd_cost.topk_strategy("native", hs.shape[0], hs.shape[1], options.hi - options.lo,
                                          options.topk, needs.weight) == "dense":
        return reference.kd_kl.fused_linear_kd_kl_given(hs, teacher, ws, mask, options, row_weight, needs)
    need_grad = row_weight is not None and (needs.hidden or needs.weight)
    loss, _, _, d_hs, d_ws = extension().fused_linear_kd_kl_given(
        hs, ws, teacher.indices - options.lo, teacher.logits, mask, float(options.temperature), options.lo,
        options.hi, row_weight if need_grad else None, need_grad and needs.weight)
    return FusedLinearKdKlResult(loss, d_hs if need_grad and needs.hidden else None,
                                 d_ws if need_grad and needs.weight else None)
