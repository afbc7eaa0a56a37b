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

import math

import torch

from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, KdKlRows, KdOptions, TeacherTopk
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


def _input_grads(d, h, ws_slice, d_hs_chunk, d_ws_slice) -> None:
    """A chunk's d hs = d logits @ W (into d_hs_chunk) and d W += d logits^T @ h (into d_ws_slice), each when
    asked for (not None)."""
    if d_hs_chunk is not None:
        d_hs_chunk.copy_(d @ ws_slice)
    if d_ws_slice is not None:
        d_ws_slice.addmm_(d.t(), h)


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
            t, index = select_topk(t, topk)
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
        _input_grads(d, h, ws_slice, None if d_hs is None else d_hs[r0:r1], d_ws_slice)
    if need_dw and not accumulate_in_place:
        d_ws[lo:hi] = d_ws_slice
    return FusedLinearKdKlResult(loss, d_hs, d_ws)


# --- the teacher as its top k ------------------------------------------------------------------------------------

def select_topk(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of float logits t [C, n]: (values, ids [C, k] int64), ids ascending, and
    among entries equal to the k-th largest the lower ids (``contract.TIES_RULE``).

    torch.topk breaks ties as it likes, so it runs on one int64 key per entry that orders the values and then
    the ids: the float32 value's bits made order-preserving (-0.0 first turned into 0.0, which it equals) in the
    high half, n - 1 - id in the low half. float64 logits take a stable descending sort instead."""
    if t.dtype == torch.float64:
        index = t.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    else:
        key = (t.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
        key = torch.where(key < 0, key ^ 0x7FFFFFFF, key).mul_(1 << 32)
        key += torch.arange(t.shape[-1] - 1, -1, -1, device=t.device)
        index = key.topk(k, dim=-1, sorted=False).indices
        del key
    index = index.sort(dim=-1).values
    return t.gather(-1, index), index


def _masked_logsumexp(t: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp over rows of t / T ([C, n] acc dtype, masked entries already -inf); -inf for a row with none."""
    return torch.logsumexp(t / temperature, dim=-1)


def teacher_topk(ht, wt, options: KdOptions, logsumexp: bool) -> TeacherTopk:
    """The teacher's top ``options.topk`` of the slice per position, chunk by chunk of positions (the memory
    bound's chunk): one GEMM, then ``select_topk``; ids absolute (in [lo, hi)), logits in the acc dtype with
    masked entries -inf."""
    lo, hi, k = options.lo, options.hi, options.topk
    acc = _acc_dtype(ht.dtype)
    rows = ht.shape[0]
    wt_slice = wt[lo:hi].to(acc)
    values = torch.empty(rows, k, dtype=acc, device=ht.device)
    index = torch.empty(rows, k, dtype=torch.int64, device=ht.device)
    lse = torch.empty(rows, dtype=acc, device=ht.device) if logsumexp else None
    step = max(1, chunk_plan(rows, hi - lo, k, ht.dtype)[0])
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        t = teacher_logits(ht[r0:r1].to(acc) @ wt_slice.t(), acc)
        values[r0:r1], index[r0:r1] = select_topk(t, k)
        if logsumexp:
            lse[r0:r1] = _masked_logsumexp(t, options.temperature)
        del t
    return TeacherTopk(index.add_(lo), values, lse)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (-inf at x = 0)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tail_chunk(s_full, index, t, lse_t_slice, alive, row_weight, temperature, need_grad):
    """The loss with the tail bucket for one chunk: the k given outcomes and the rest of the slice as one more,
    in both distributions. s_full [C, n] the student's logits of the slice, index [C, k] (relative), t [C, k] the
    teacher's logits (masked: -inf), lse_t_slice [C] the teacher's logsumexp of the slice at T. Returns (loss,
    d loss / d s_full or None); d reaches every logit: T w (p_v - q_v) on the k, T w p_v (Q_K - q_r P_K / p_r)
    elsewhere (P_K, Q_K: the student's and teacher's mass on the k; p_r, q_r: outside them)."""
    s_full = s_full / temperature
    lse_s = torch.logsumexp(s_full, dim=-1)
    log_p = s_full.gather(-1, index) - lse_s.unsqueeze(-1)          # log p_i over the whole slice
    lse_t = torch.where(alive, lse_t_slice, torch.zeros_like(lse_t_slice))
    log_q = t / temperature - lse_t.unsqueeze(-1)
    q = log_q.exp()
    # A rest mass is 1 - (the mass on the k) in the acc dtype: below a few ulps of 1 it is rounding noise (k equal
    # to the slice, or everything outside masked) and counts 0; the student's is kept above the smallest normal.
    finfo = torch.finfo(s_full.dtype)
    log_p_rest = _log1mexp(torch.logsumexp(log_p, dim=-1)).clamp(min=math.log(finfo.tiny))
    log_q_rest = _log1mexp(torch.logsumexp(log_q, dim=-1))
    q_rest = log_q_rest.exp()
    q_rest = torch.where(q_rest > 4 * finfo.eps, q_rest, torch.zeros_like(q_rest))
    inside = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)
    rest = torch.where(q_rest > 0, q_rest * (log_q_rest - log_p_rest), torch.zeros_like(q_rest))
    zero = torch.zeros_like(lse_s)
    loss = torch.where(alive, temperature * temperature * (inside + rest), zero)
    if not need_grad:
        return loss, None
    scale = torch.where(alive, temperature * row_weight, zero)
    p_full = (s_full - lse_s.unsqueeze(-1)).exp_()
    mass_p, mass_q = log_p.exp().sum(dim=-1), q.sum(dim=-1)
    ratio = torch.where(q_rest > 0, q_rest / log_p_rest.exp(), zero)
    d = p_full.mul_((scale * (mass_q - ratio * mass_p)).unsqueeze(-1))
    d.scatter_(-1, index, (log_p.exp() - q) * scale.unsqueeze(-1))
    return loss, d.masked_fill_(~alive.unsqueeze(-1), 0.0)  # dead rows' saved values may be inf: select


def fused_linear_kd_kl_given(hs, teacher: TeacherTopk, ws, mask, options: KdOptions, row_weight,
                             needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The fused-linear KD loss with the teacher given as its top k (``TeacherTopk``, [P, k], ids in [lo, hi)).

    Dense student tiles (a chunked gather plus batched products measured slower on CPU than the two dense GEMMs
    per chunk): per chunk the student's logits of the slice by one GEMM, gathered at the ids (or, with the tail
    bucket, used whole), the row pass, the d logits scattered back, then d hs and d ws as in
    ``fused_linear_kd_kl``."""
    temperature, lo, hi, k = options.temperature, options.lo, options.hi, options.topk
    need_dh, need_dw = needs
    acc = _acc_dtype(hs.dtype)
    rows, n_vocab = hs.shape[0], hi - lo
    ws_slice = ws[lo:hi].to(acc)
    loss = torch.zeros(rows, dtype=acc, device=hs.device)
    d_hs = torch.empty_like(hs) if need_dh else None
    d_ws = d_ws_slice = None
    accumulate_in_place = ws.dtype == acc
    if need_dw:
        d_ws = torch.zeros_like(ws)
        d_ws_slice = d_ws[lo:hi] if accumulate_in_place else torch.zeros(n_vocab, ws.shape[1], dtype=acc,
                                                                             device=ws.device)
    need_grad = need_dh or need_dw
    step = max(1, chunk_plan(rows, n_vocab, k, hs.dtype)[0])
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s_full = d = None
        h = hs[r0:r1].to(acc)
        s_full = h @ ws_slice.t()
        index = teacher.indices[r0:r1].to(torch.int64) - lo
        t = teacher_logits(teacher.logits[r0:r1], acc)
        alive = t.amax(dim=-1) > float("-inf")
        if mask is not None:
            alive &= mask[r0:r1]
        weight = None if row_weight is None else row_weight[r0:r1].to(acc)
        if options.topk_tail:
            loss[r0:r1], d = _tail_chunk(s_full, index, t, teacher.logsumexp[r0:r1].to(acc), alive, weight,
                                         temperature, need_grad)
        else:
            loss[r0:r1], d = _fused_chunk(s_full.gather(-1, index), t, alive, weight, temperature, need_grad)
            if need_grad:
                d = s_full.zero_().scatter_(-1, index, d)
        if need_grad:
            _input_grads(d, h, ws_slice, None if d_hs is None else d_hs[r0:r1], d_ws_slice)
    if need_dw and not accumulate_in_place:
        d_ws[lo:hi] = d_ws_slice
    return FusedLinearKdKlResult(loss, d_hs, d_ws)
