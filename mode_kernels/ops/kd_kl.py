"""kd_kl_loss: T^2 * KL(teacher || student) on logits, as torch custom ops.

The op computes one float32 loss per row and keeps only the two per-row logsumexps for the
backward; masking and the reduction are plain (differentiable, sync-free) torch around it. In plain eager
mode the API calls the same forward and backward without the custom ops (``_dispatch``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .._validation import check_kd_kl
from ..contract import kd_options
from ._dispatch import InputGrads, autograd_function, call, call_differentiable


def _forward(student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float, lo: int, hi: int,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse_s, lse_t) per row (``KdKlRows``, flat)."""
    impl = backends.implementation(backend, "kd_kl")
    return tuple(impl.kd_kl_forward(student, teacher, mask, kd_options(temperature, lo, hi)))


_INPUT_GRADS = InputGrads(_forward, ("student",))
_kd_kl = torch.library.custom_op("mode_kernels::kd_kl", _forward, mutates_args=())


@_kd_kl.register_fake
def _(student, teacher, mask, temperature, lo, hi, backend):
    rows = student.new_empty(student.shape[0], dtype=loss_dtype(student))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


def _backward_grad(grad_rows: Tensor, student: Tensor, teacher: Tensor, mask: Tensor | None, lse_s: Tensor,
                   lse_t: Tensor, temperature: float, lo: int, hi: int, backend: str) -> Tensor:
    impl = backends.implementation(backend, "kd_kl")
    return impl.kd_kl_backward(grad_rows.contiguous(), student, teacher, mask, lse_s, lse_t,
                               kd_options(temperature, lo, hi))


_kd_kl_backward = torch.library.custom_op("mode_kernels::kd_kl_backward", _backward_grad, mutates_args=())


@_kd_kl_backward.register_fake
def _(grad_rows, student, teacher, mask, lse_s, lse_t, temperature, lo, hi, backend):
    return torch.empty_like(student)


def _kd_setup(ctx, inputs, output):
    student, teacher, mask, temperature, lo, hi, backend = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(student, teacher, mask, lse_s, lse_t)
    ctx.meta = (temperature, lo, hi, backend)


def _kd_backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t):
    student, teacher, mask, lse_s, lse_t = ctx.saved_tensors
    grad = call(_kd_kl_backward, _backward_grad, grad_rows, student, teacher, mask, lse_s, lse_t, *ctx.meta)
    return _INPUT_GRADS.returns((grad,))


_kd_kl.register_autograd(_kd_backward, setup_context=_kd_setup)
_KdKl = autograd_function(_forward, _kd_setup, _kd_backward)


def loss_dtype(t: Tensor) -> torch.dtype:
    """Losses are float32 (float64 for float64 inputs, so gradcheck can run)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reduce_rows(loss_rows: Tensor, mask: Tensor | None, reduction: str, lead_shape: tuple) -> Tensor:
    """Apply a mask and a reduction to per-row losses, with no host sync."""
    if mask is not None:
        loss_rows = torch.where(mask, loss_rows, torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows.reshape(lead_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(loss_rows.shape[0], 1)
    return total / mask.sum().clamp(min=1).to(loss_rows.dtype)


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None, vocab_range: tuple[int, int] | None = None,
               topk: int | None = None, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Knowledge-distillation loss T^2 * KL(p_teacher || p_student), p = softmax(logits / T).

    Args:
        student_logits: [..., V]. The gradient flows to the student only.
        teacher_logits: [..., V], the shape of student_logits; a constant.
        temperature: T > 0.
        mask: bool [...] of positions that count.
        vocab_range: (lo, hi): only the vocab slice [lo, hi) counts (softmax over the slice).
        topk: only the teacher's k largest logits (inside the slice) count; both distributions
            are renormalised on that set.
        reduction: "mean" over counted positions (0 when none), "sum", or "none" (per position,
            uncounted positions 0).
        backend: "auto", "torch", "triton" or "native".

    A vocab entry with teacher probability 0 (logit -inf or the dtype's most negative value)
    contributes 0; a position whose teacher has no finite logit in the slice contributes 0.
    """
    options, reduction, mask = check_kd_kl(student_logits, teacher_logits, temperature, vocab_range, topk,
                                           reduction, mask)
    resolved = backends.resolve(backend, student_logits.device, "kd_kl")
    vocab, (lo, hi) = student_logits.shape[-1], (options.lo, options.hi)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    if options.topk is not None:  # the backends see the gathered top-k logits as a whole vocab
        teacher, index = teacher[:, lo:hi].topk(options.topk, dim=-1)
        student = student[:, lo:hi].gather(-1, index)
        lo, hi = 0, options.topk
    loss_rows, _, _ = call_differentiable(_kd_kl, _KdKl, student, teacher, flat_mask, options.temperature, lo, hi,
                                          resolved)
    return reduce_rows(loss_rows, flat_mask, reduction, tuple(student_logits.shape[:-1]))
