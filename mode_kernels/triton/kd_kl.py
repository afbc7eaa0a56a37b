"""Triton KD loss T^2 * KL(teacher || student) on logits, forward and backward.

Forward: one pass over the vocab slice [lo, hi) in chunks. Per row it keeps an online
(running max, rescaled sum) logsumexp of the student and of the teacher, and the running
p_t-weighted mean of (t - s); at the end
    KL = E_pt[t - s] - lse_t + lse_s        (logits already divided by T)
and the loss is T^2 * KL. Only the two logsumexps per row are saved for the backward, which
recomputes d student = T * (p_s - p_t) * grad chunk by chunk. The slice is read in place
(column masks on the input rows, any row stride): no copies.

All softmax math is float32 in base-2 units (x * log2(e) / T) so it runs on exp2/log2; the
saved logsumexps are natural-log, as the reference's.

The fused-linear op (mode_kernels.triton.fused_linear_kd_kl) runs ``kd_kl_forward_backward`` on
each chunk of float32 logits it computes: loss and d logits in one kernel (the statistics sweep,
then the gradient sweep with the logsumexps kept in registers), sharing the row sweeps below.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_GRID

LOG2E = math.log2(math.e)
# The same constants as seen from inside kernels (Triton globals must be constexpr).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(math.log(2.0))


# ----------------------------------------------------------------------------- shared math
@triton.jit
def online_kl_update(s, t, m_s, l_s, m_t, l_t, cross):
    """Fold a tile of scaled logits s, t [R, C] (base-2 units, -inf where absent) into the
    per-row running statistics [R]: maxima m, sums l of exp2(x - m), and
    cross = E_pt[t - s] over the entries seen so far with nonzero teacher probability.

    cross is kept as a p_t-weighted mean, not a sum: a mean of finite values cannot overflow,
    whereas a sum can when a chunk holds only mask values (finfo.min) that are the running
    maximum for a while (128 x -1e38 is -inf, and -inf * 0 later is NaN)."""
    m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
    m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
    # A row that has seen only -inf keeps a -inf max: shift by 0 there, not by -inf (NaN).
    shift_s = tl.where(m_s_new == float("-inf"), 0.0, m_s_new)
    shift_t = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
    l_s = l_s * tl.exp2(m_s - shift_s) + tl.sum(tl.exp2(s - shift_s[:, None]), axis=1)
    l_t_kept = l_t * tl.exp2(m_t - shift_t)
    w_t = tl.exp2(t - shift_t[:, None])
    l_t = l_t_kept + tl.sum(w_t, axis=1)
    inv_l_t = tl.where(l_t > 0.0, 1.0 / l_t, 0.0)
    # Entries whose teacher probability is 0 contribute 0 (there t - s may be -inf or NaN).
    tile = tl.sum(tl.where(w_t > 0.0, (w_t * inv_l_t[:, None]) * (t - s), 0.0), axis=1)
    cross = cross * (l_t_kept * inv_l_t) + tile
    return m_s_new, l_s, m_t_new, l_t, cross


@triton.jit
def kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature):
    """Per-row (loss, lse_s, lse_t) from the running statistics; zeros on dead rows.

    KL = E_pt[t - s] - (lse_t - lse_s), with lse = m + log2(l) in base 2; the max difference
    and the log of the sum ratio are taken separately to keep the cancellation small."""
    kl2 = cross - (m_t - m_s) - tl.log2(l_t / l_s)
    loss = temperature * temperature * LN2_K * kl2
    lse_s = LN2_K * (m_s + tl.log2(l_s))
    lse_t = LN2_K * (m_t + tl.log2(l_t))
    return tl.where(alive, loss, 0.0), tl.where(alive, lse_s, 0.0), tl.where(alive, lse_t, 0.0)


@triton.jit
def kl_grad_tile(s, t, lse_s2, lse_t2, row_scale, alive):
    """d loss / d student logits for a tile s, t [R, C] (base-2 units): row_scale * (p_s - p_t),
    with row_scale = T * grad [R]; 0 on dead rows and where s, t are -inf."""
    d = (tl.exp2(s - lse_s2[:, None]) - tl.exp2(t - lse_t2[:, None])) * row_scale[:, None]
    return tl.where(alive[:, None], d, 0.0)


@triton.jit
def load_live_rows(mask_ptr, rows, n_rows, HAS_MASK: tl.constexpr):
    """Rows that exist and are counted by the mask."""
    live = rows < n_rows
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=live, other=0) != 0)
    return live


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_block_stats(s_row, t_row, live, lo, n_cols, scale2, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Running statistics of a block of rows over the slice [lo, lo + n_cols). Row pointers are
    at column 0 and the chunks are aligned to BLOCK_V, so loads stay vectorised for any lo
    (MoDE's is 4)."""
    m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_R], tl.float32)
    l_t = tl.zeros([BLOCK_R], tl.float32)
    cross = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(lo // BLOCK_V * BLOCK_V, lo + n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        ld = live[:, None] & ((cols >= lo) & (cols < lo + n_cols))[None, :]
        s = tl.load(s_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        t = tl.load(t_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        m_s, l_s, m_t, l_t, cross = online_kl_update(s, t, m_s, l_s, m_t, l_t, cross)
    return m_s, l_s, m_t, l_t, cross


@triton.jit
def _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, lo, hi, n_cols, lse_s, lse_t, row_scale, scale2,
                             BLOCK_V: tl.constexpr):
    """Whole rows [0, n_cols) of d student: row_scale * (p_s - p_t) inside [lo, hi), 0 outside
    (so the output needs no memset)."""
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        in_slice = (cols >= lo) & (cols < hi)
        ld = alive[:, None] & in_slice[None, :]
        s = tl.load(s_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        t = tl.load(t_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        d = kl_grad_tile(s, t, lse_s * LOG2E_K, lse_t * LOG2E_K, row_scale, alive)
        tl.store(d_row + cols[None, :], d.to(d_row.dtype.element_ty), mask=ok[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _kd_kl_fwd_kernel(student_ptr, teacher_ptr, mask_ptr, loss_ptr, lse_s_ptr, lse_t_ptr,
                      n_rows, n_cols, lo, stride_s, stride_t, scale2, temperature,
                      HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Each program owns blocks of BLOCK_R rows (grid-strided, P may exceed the grid limit) and
    sweeps the vocab slice [lo, lo + n_cols) in BLOCK_V chunks."""
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        s_row = student_ptr + rows.to(tl.int64)[:, None] * stride_s
        t_row = teacher_ptr + rows.to(tl.int64)[:, None] * stride_t
        m_s, l_s, m_t, l_t, cross = _row_block_stats(s_row, t_row, live, lo, n_cols, scale2, BLOCK_R, BLOCK_V)
        # A teacher with no finite logit in the slice gives no distribution: the row is dead.
        alive = live & (m_t > float("-inf"))
        loss, lse_s, lse_t = kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature)
        ok = rows < n_rows
        tl.store(loss_ptr + rows, loss, mask=ok)
        tl.store(lse_s_ptr + rows, lse_s, mask=ok)
        tl.store(lse_t_ptr + rows, lse_t, mask=ok)


@triton.jit
def _kd_kl_bwd_kernel(grad_rows_ptr, student_ptr, teacher_ptr, mask_ptr, lse_s_ptr, lse_t_ptr, d_student_ptr,
                      n_rows, n_cols, lo, hi, stride_s, stride_t, stride_d, scale2, temperature,
                      HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Writes whole rows of d student = T * (p_s - p_t) * grad from the saved logsumexps.
    Pointers are at column 0; n_cols is the full vocab."""
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        s_row = student_ptr + rows.to(tl.int64)[:, None] * stride_s
        t_row = teacher_ptr + rows.to(tl.int64)[:, None] * stride_t
        lse_s = tl.load(lse_s_ptr + rows, mask=ok, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=ok, other=0.0)
        # The forward marks a dead row (teacher all -inf) only by lse_s = lse_t = 0. A live row
        # can have both 0 too, so in that rare case look at the teacher row to tell them apart.
        ambiguous = live & (lse_s == 0.0) & (lse_t == 0.0)
        alive = live & ~ambiguous
        if tl.sum(ambiguous.to(tl.int32)) > 0:
            t_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
            for c0 in range(lo // BLOCK_V * BLOCK_V, hi, BLOCK_V):
                cols = c0 + tl.arange(0, BLOCK_V)
                ld = ambiguous[:, None] & ((cols >= lo) & (cols < hi))[None, :]
                t = tl.load(t_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
                t_max = tl.maximum(t_max, tl.max(t, axis=1))
            alive = alive | (ambiguous & (t_max > float("-inf")))
        row_scale = temperature * tl.load(grad_rows_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        d_row = d_student_ptr + rows.to(tl.int64)[:, None] * stride_d
        _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, lo, hi, n_cols, lse_s, lse_t, row_scale, scale2,
                                 BLOCK_V)


@triton.jit
def _kd_kl_fwd_bwd_kernel(grad_rows_ptr, student_ptr, teacher_ptr, mask_ptr, loss_ptr, d_student_ptr,
                          n_rows, n_cols, stride_s, stride_t, stride_d, scale2, temperature,
                          HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Loss and d student of whole rows [0, n_cols) in one row pass: the statistics sweep, then
    the gradient sweep (the rows are still in L2), with the logsumexps kept in registers."""
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        s_row = student_ptr + rows.to(tl.int64)[:, None] * stride_s
        t_row = teacher_ptr + rows.to(tl.int64)[:, None] * stride_t
        m_s, l_s, m_t, l_t, cross = _row_block_stats(s_row, t_row, live, 0, n_cols, scale2, BLOCK_R, BLOCK_V)
        alive = live & (m_t > float("-inf"))
        loss, lse_s, lse_t = kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature)
        tl.store(loss_ptr + rows, loss, mask=ok)
        row_scale = temperature * tl.load(grad_rows_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        d_row = d_student_ptr + rows.to(tl.int64)[:, None] * stride_d
        _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, 0, n_cols, n_cols, lse_s, lse_t, row_scale,
                                 scale2, BLOCK_V)


# ----------------------------------------------------------------------------- tuning
# (BLOCK_R, BLOCK_V, num_warps, num_stages): several short rows per program for small slices
# (topk), one long row per program for big ones. Multi-row tiles cost many registers (16 x 64
# uses ~150 on sm_80; 32 x 64 with 4 warps spills), hence no bigger ones.
_CONFIGS = [(16, 64, 4, 2), (8, 256, 8, 2), (2, 1024, 8, 2), (1, 2048, 4, 2), (1, 4096, 8, 2), (1, 8192, 8, 2)]
_INTERPRET_CONFIGS = [(4, 128, 4, 1)]  # the interpreter is slow; one small config covers chunking


def _configs():
    return [triton.Config({"BLOCK_R": r, "BLOCK_V": v}, num_warps=w, num_stages=st)
            for r, v, w, st in (_INTERPRET_CONFIGS if INTERPRET else _CONFIGS)]


def _prune(configs, named_args, **kwargs):
    """Keep the three configs with the largest chunk that does not overshoot the slice."""
    width = max(64, triton.next_power_of_2(named_args["n_cols"]))
    fits = sorted((c for c in configs if c.kwargs["BLOCK_V"] <= width), key=lambda c: -c.kwargs["BLOCK_V"])
    return fits[:3] or configs[:1]


_kd_kl_fwd = triton.autotune(_configs(), key=["n_cols"], prune_configs_by={"early_config_prune": _prune})(
    _kd_kl_fwd_kernel)
_kd_kl_bwd = triton.autotune(_configs(), key=["n_cols"], prune_configs_by={"early_config_prune": _prune})(
    _kd_kl_bwd_kernel)
_kd_kl_fwd_bwd = triton.autotune(_configs(), key=["n_cols"], prune_configs_by={"early_config_prune": _prune})(
    _kd_kl_fwd_bwd_kernel)


# ----------------------------------------------------------------------------- launchers
def check_triton_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: the triton backend takes float32, bfloat16 or float16, got {t.dtype} "
                         "(use backend='torch' for float64)")


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along a row."""
    return t if t.stride(-1) == 1 else t.contiguous()


def like_with_unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """An output like t (the strides the custom op's fake implementation promises, empty_like),
    unless that layout lacks unit stride along rows."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _grid(meta, n_rows):
    return (max(1, min(triton.cdiv(n_rows, meta["BLOCK_R"]), MAX_GRID)),)


def kd_kl_forward(student, teacher, mask, temperature, lo, hi):
    """student, teacher: [P, V]; mask: bool [P] or None. Returns float32 (loss, lse_s, lse_t), each [P]."""
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    student, teacher = unit_stride_rows(student), unit_stride_rows(teacher)
    n_rows = student.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    if n_rows == 0:
        return loss, lse_s, lse_t
    mask_arg = loss if mask is None else mask.contiguous()
    _kd_kl_fwd[lambda meta: _grid(meta, n_rows)](
        student, teacher, mask_arg, loss, lse_s, lse_t,
        n_rows, hi - lo, lo, student.stride(0), teacher.stride(0), LOG2E / temperature, float(temperature),
        HAS_MASK=mask is not None)
    return loss, lse_s, lse_t


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, temperature, lo, hi):
    """d loss / d student [P, V] in the student's dtype (zero outside [lo, hi))."""
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    d_student = like_with_unit_stride_rows(student)
    student, teacher = unit_stride_rows(student), unit_stride_rows(teacher)
    n_rows, n_cols = student.shape
    if n_rows == 0 or n_cols == 0:
        return d_student
    mask_arg = lse_s if mask is None else mask.contiguous()
    _kd_kl_bwd[lambda meta: _grid(meta, n_rows)](
        grad_rows.contiguous(), student, teacher, mask_arg, lse_s.contiguous(), lse_t.contiguous(), d_student,
        n_rows, n_cols, lo, hi, student.stride(0), teacher.stride(0), d_student.stride(0),
        LOG2E / temperature, float(temperature), HAS_MASK=mask is not None)
    return d_student


def kd_kl_forward_backward(grad_rows, student, teacher, mask, temperature, d_student):
    """The loss rows (float32 [P]) of whole rows of student, teacher [P, n] (no slice), and
    d loss / d student with grad_rows as the rows' output gradients, written into d_student
    ([P, n], any dtype and row stride)."""
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    n_rows, n_cols = student.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss
    mask_arg = loss if mask is None else mask.contiguous()
    _kd_kl_fwd_bwd[lambda meta: _grid(meta, n_rows)](
        grad_rows.contiguous(), student, teacher, mask_arg, loss, d_student,
        n_rows, n_cols, student.stride(0), teacher.stride(0), d_student.stride(0),
        LOG2E / temperature, float(temperature), HAS_MASK=mask is not None)
    return loss
