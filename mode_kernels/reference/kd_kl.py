"""Reference (pure PyTorch) KD loss KL(teacher || student) at temperature T, per row.

Rows are processed in chunks so at most ``CHUNK_ELEMENTS`` float32 logits exist at once,
for the logits form and the fused-linear form alike. Per row (slice [lo, hi) of the vocab):
    loss = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)),   p = softmax(logits / T)
Teacher logits of -inf or of their dtype's most negative finite value (how Chameleon masks
logits) are masked: probability 0, contributing 0. Rows that are masked out, or whose teacher has no finite
logit in the slice, have loss 0 and gradient 0.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 logits


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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


def kd_kl_forward(student, teacher, mask, temperature, lo, hi):
    """student, teacher: [P, V]; mask: bool [P] or None. Returns (loss [P], lse_s [P], lse_t [P])."""
    acc = _acc_dtype(student)
    rows = student.shape[0]
    loss = torch.zeros(rows, dtype=acc, device=student.device)
    lse_s, lse_t = torch.zeros_like(loss), torch.zeros_like(loss)
    for r0, r1 in _row_chunks(rows, hi - lo):
        m = None if mask is None else mask[r0:r1]
        out = kl_rows(student[r0:r1, lo:hi].to(acc), teacher_logits(teacher[r0:r1, lo:hi], acc), temperature, m)
        loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1] = out[:3]
    return loss, lse_s, lse_t


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, temperature, lo, hi):
    """d loss / d student [P, V] in the student's dtype (zero outside [lo, hi))."""
    acc = _acc_dtype(student)
    grad = torch.zeros_like(student)
    for r0, r1 in _row_chunks(student.shape[0], hi - lo):
        t = teacher_logits(teacher[r0:r1, lo:hi], acc)
        alive = _alive(t, None if mask is None else mask[r0:r1])
        d = dlogits_rows(student[r0:r1, lo:hi].to(acc), t, lse_s[r0:r1], lse_t[r0:r1],
                         grad_rows[r0:r1].to(acc), temperature, alive)
        grad[r0:r1, lo:hi] = d.to(student.dtype)
    return grad


def fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi):
    """hs, ht: [P, H]; ws, wt: [V, H] (wt None means ws). Returns (loss, lse_s, lse_t), each [P]."""
    acc = _acc_dtype(hs)
    ws_slice = ws[lo:hi].to(acc)
    wt_slice = ws_slice if wt is None else wt[lo:hi].to(acc)
    rows = hs.shape[0]
    loss = torch.zeros(rows, dtype=acc, device=hs.device)
    lse_s, lse_t = torch.zeros_like(loss), torch.zeros_like(loss)
    for r0, r1 in _row_chunks(rows, hi - lo):
        m = None if mask is None else mask[r0:r1]
        s = hs[r0:r1].to(acc) @ ws_slice.t()
        t = ht[r0:r1].to(acc) @ wt_slice.t()
        loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1] = kl_rows(s, t, temperature, m)[:3]
    return loss, lse_s, lse_t


def fused_linear_kd_kl_backward(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t, temperature, lo, hi, need_dw):
    """(d hs [P, H] in hs's dtype, d ws [V, H] in ws's dtype or None). The teacher is a constant."""
    acc = _acc_dtype(hs)
    ws_slice = ws[lo:hi].to(acc)
    wt_slice = ws_slice if wt is None else wt[lo:hi].to(acc)
    d_hs = torch.zeros_like(hs)
    d_ws = torch.zeros(hi - lo, ws.shape[1], dtype=acc, device=ws.device) if need_dw else None
    for r0, r1 in _row_chunks(hs.shape[0], hi - lo):
        h = hs[r0:r1].to(acc)
        t = ht[r0:r1].to(acc) @ wt_slice.t()
        alive = _alive(t, None if mask is None else mask[r0:r1])
        d = dlogits_rows(h @ ws_slice.t(), t, lse_s[r0:r1], lse_t[r0:r1], grad_rows[r0:r1].to(acc),
                         temperature, alive)
        d_hs[r0:r1] = (d @ ws_slice).to(hs.dtype)
        if need_dw:
            d_ws += d.t() @ h
    if need_dw:
        full = torch.zeros_like(ws)
        full[lo:hi] = d_ws.to(ws.dtype)
        d_ws = full
    return d_hs, d_ws
