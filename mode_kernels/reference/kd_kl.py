"""Reference (pure PyTorch) KD loss KL(teacher || student) at temperature T, per row.

The logits form processes rows in chunks of at most ``CHUNK_ELEMENTS`` float32 logits; the
fused-linear form in chunks sized by its memory bound (``mode_kernels.kd_memory``), computing
its gradients in the same pass as the loss. Per row (slice [lo, hi) of the vocab):
    loss = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)),   p = softmax(logits / T)
Teacher logits of -inf or of their dtype's most negative finite value (how Chameleon masks
logits) are masked: probability 0, contributing 0. Rows that are masked out, or whose teacher has no finite
logit in the slice, have loss 0 and gradient 0.
"""
from __future__ import annotations

import torch

from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, KdKlRows, KdOptions
from ..kd_memory import chunk_rows

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 logits


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def teacher_logits(chunk: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Teacher logits in the accumulation dtype, with finfo.min entries turned into -inf."""
    return chunk.to(acc).masked_fill(chunk <= torch.finfo(chunk.dtype).min, float("-inf"))


def _alive(t_chunk, mask_chunk):
    alive = t_chunk.amax(dim=-1) > float("-inf")
    return alive if mask_chunk is None else alive & mask_chunk


def kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, mask_chunk):
    """Loss and logsumexps of one chunk of float logits [rows, V] (already sliced)."""
    alive = _alive(t, mask_chunk)
    s = s / temperature
    t = t / temperature
    lse_s = torch.logsumexp(s, dim=-1)
    lse_t = torch.logsumexp(t, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)  # max-shifted: exact even for huge logits
    pt = log_pt.exp()
    term = torch.where(pt > 0, pt * (log_pt - torch.log_softmax(s, dim=-1)), torch.zeros_like(pt))
    loss = temperature * temperature * term.sum(dim=-1)
    zero = torch.zeros_like(loss)
    return torch.where(alive, loss, zero), torch.where(alive, lse_s, zero), torch.where(alive, lse_t, zero), alive


def dlogits_rows(s, t, lse_s, lse_t, grad_rows, temperature, alive):
    """d loss / d student logits for one chunk: T * (p_s - p_t) * grad, zero on dead rows."""
    ps = (s / temperature - lse_s.unsqueeze(-1)).exp()
    pt = (t / temperature - lse_t.unsqueeze(-1)).exp()
    # dead rows saved lse = 0, so their p may overflow: select, never multiply by 0
    d = (ps - pt) * (grad_rows * temperature).unsqueeze(-1)
    return torch.where(alive.unsqueeze(-1), d, torch.zeros_like(d))


def kd_kl_forward(student, teacher, mask, options: KdOptions) -> KdKlRows:
    """student, teacher: [P, V]; mask: bool [P] or None. Returns (loss [P], lse_s [P], lse_t [P])."""
    temperature, lo, hi = options.temperature, options.lo, options.hi
    acc = _acc_dtype(student.dtype)
    rows = student.shape[0]
    loss = torch.zeros(rows, dtype=acc, device=student.device)
    lse_s, lse_t = torch.zeros_like(loss), torch.zeros_like(loss)
    for r0, r1 in _row_chunks(rows, hi - lo):
        m = None if mask is None else mask[r0:r1]
        out = kl_rows(student[r0:r1, lo:hi].to(acc), teacher_logits(teacher[r0:r1, lo:hi], acc), temperature, m)
        loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1] = out[:3]
    return KdKlRows(loss, lse_s, lse_t)


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, options: KdOptions):
    """d loss / d student [P, V] in the student's dtype (zero outside [lo, hi))."""
    temperature, lo, hi = options.temperature, options.lo, options.hi
    acc = _acc_dtype(student.dtype)
    grad = torch.zeros_like(student)
    for r0, r1 in _row_chunks(student.shape[0], hi - lo):
        t = teacher_logits(teacher[r0:r1, lo:hi], acc)
        alive = _alive(t, None if mask is None else mask[r0:r1])
        d = dlogits_rows(student[r0:r1, lo:hi].to(acc), t, lse_s[r0:r1], lse_t[r0:r1],
                         grad_rows[r0:r1].to(acc), temperature, alive)
        grad[r0:r1, lo:hi] = d.to(student.dtype)
    return grad


def _log_softmax_(x: torch.Tensor, temperature: float):
    """x <- log_softmax(x / T) in place, returning the logsumexp of x / T; one temporary the
    size of x. Rows with no finite entry come out NaN (their callers select them away)."""
    x.div_(temperature)
    top = x.amax(dim=-1, keepdim=True)
    x.sub_(top.masked_fill(top == float("-inf"), 0.0))
    log_sum = x.exp().sum(dim=-1, keepdim=True).log_()
    x.sub_(log_sum)
    return (top + log_sum).squeeze(-1)


def _fused_chunk(s, t, alive, row_weight, temperature, need_grad):
    """Loss rows of one chunk of float logits s, t [C, n], and (need_grad) d loss / d s in s:
    T * row_weight * (p_s - p_t), zero on dead rows. Overwrites s and t; besides them at most
    one [C, n] temporary and one bool [C, n] mask are alive at once."""
    t.masked_fill_(t <= torch.finfo(t.dtype).min, float("-inf"))
    _log_softmax_(s, temperature)
    _log_softmax_(t, temperature)
    pt = t.exp()
    term = t.sub_(s).mul_(pt).masked_fill_(pt == 0, 0.0)  # p_t (log p_t - log p_s); p_t = 0 counts 0
    loss = temperature * temperature * term.sum(dim=-1)
    loss = torch.where(alive, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, None
    d = s.exp_().sub_(pt).mul_((temperature * row_weight).unsqueeze(-1))
    return loss, d.masked_fill_(~alive.unsqueeze(-1), 0.0)


def fused_bytes_per_row(n_vocab: int, topk: int | None, acc: torch.dtype) -> int:
    """What one position of a chunk holds in ``fused_linear_kd_kl``: the two logits rows, one
    temporary row and a bool row of ``_fused_chunk``; with top-k also the selected values,
    indices and their temporaries (at most 5 float and 9 byte-wide entries per selected one)."""
    size = acc.itemsize
    return n_vocab * (3 * size + 1) + (topk or 0) * (5 * size + 9)


def chunk_plan(n_rows: int, n_vocab: int, topk: int | None, dtype: torch.dtype):
    """(positions per chunk, bytes one position of a chunk holds) of ``fused_linear_kd_kl`` for
    inputs of ``dtype``: the memory bound's chunk."""
    per_row = fused_bytes_per_row(n_vocab, topk, _acc_dtype(dtype))
    return chunk_rows(n_rows, n_vocab, dtype, per_row), per_row


def fused_linear_kd_kl(hs, ht, ws, wt, mask, options: KdOptions, row_weight,
                       needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The fused-linear KD loss per position and, when asked, the gradients of
    sum_p row_weight[p] * loss[p] (the teacher is a constant).

    hs, ht: [P, H]; ws, wt: [V, H] (wt None means ws); mask: bool [P] or None; row_weight: [P] (used only for
    the gradients). Returns (loss [P] float32/float64, d hs [P, H] in hs's dtype or None, d ws [V, H] in ws's
    dtype or None).

    Chunks of positions (``kd_memory.chunk_rows``): per chunk both logits by one GEMM each, the
    softmaxes, loss and d logits in place, then d hs = d logits @ ws and d ws += d logits^T @ hs:
    three GEMMs per chunk with a frozen weight, four with a trainable one, nothing recomputed.
    d ws accumulates in float32 (float64) into the slice's rows only: in place in the output when
    ws is float32 (float64), else in one extra [hi - lo, H] buffer."""
    temperature, lo, hi, topk = options.temperature, options.lo, options.hi, options.topk
    need_dh, need_dw = needs
    acc = _acc_dtype(hs.dtype)
    rows, n_vocab = hs.shape[0], hi - lo
    ws_slice = ws[lo:hi].to(acc)
    wt_slice = ws_slice if wt is None else wt[lo:hi].to(acc)
    loss = torch.zeros(rows, dtype=acc, device=hs.device)
    d_hs = torch.empty_like(hs) if need_dh else None
    d_ws = d_ws_slice = None
    accumulate_in_place = ws.dtype == acc
    if need_dw:
        d_ws = torch.zeros_like(ws)  # rows outside [lo, hi) get no gradient
        d_ws_slice = d_ws[lo:hi] if accumulate_in_place else torch.zeros(n_vocab, ws.shape[1], dtype=acc,
                                                                             device=ws.device)
    need_grad = need_dh or need_dw
    step = chunk_plan(rows, n_vocab, topk, hs.dtype)[0]
    for r0 in range(0, rows, max(step, 1)):  # (no rows: a plan of 0 rows per chunk)
        r1 = min(rows, r0 + step)
        s = d = s_full = None  # free the last chunk's logits before this chunk's are made
        h = hs[r0:r1].to(acc)
        s = h @ ws_slice.t()
        t = ht[r0:r1].to(acc) @ wt_slice.t()
        if topk is not None:
            t, index = t.topk(topk, dim=-1)
            s_full, s = s, s.gather(-1, index)
        alive = t.amax(dim=-1) > float("-inf")
        if mask is not None:
            alive &= mask[r0:r1]
        weight = None if row_weight is None else row_weight[r0:r1].to(acc)
        loss[r0:r1], d = _fused_chunk(s, t, alive, weight, temperature, need_grad)
        del t
        if not need_grad:
            continue
        if topk is not None:
            d = s_full.zero_().scatter_(-1, index, d)
        if need_dh:
            d_hs[r0:r1] = d @ ws_slice
        if need_dw:
            d_ws_slice.addmm_(d.t(), h)
    if need_dw and not accumulate_in_place:
        d_ws[lo:hi] = d_ws_slice
    return FusedLinearKdKlResult(loss, d_hs, d_ws)
