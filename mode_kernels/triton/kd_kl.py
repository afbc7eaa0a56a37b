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

Few rows: one program per row (block) leaves most of the GPU idle when there are fewer rows than
a few programs per SM (a 16-position chunk, a short batch). Then the slice is split over the
vocabulary (``vocab_split_cols``): each program keeps the running statistics of one segment of
one row block in a small float32 buffer [5, P, segments], a second pass merges them per row
(``merge_kl_stats``: the partial logsumexps rescaled to the common maximum, the p_t-weighted
means reweighted by each segment's teacher mass) into the loss and logsumexps, and the gradient
sweep runs over column segments too. Deterministic: fixed merge order, no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..contract import KdKlRows, KdOptions
from ._common import INTERPRET, MAX_GRID, sm_count

LOG2E = math.log2(math.e)
# The same constants as seen from inside kernels (Triton globals must be constexpr).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(math.log(2.0))
# The per-segment statistics a split row pass keeps: m_s, l_s, m_t, l_t, cross (online_kl_update's).
N_STATS = 5


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
    # Entries whose teacher probability is 0 contribute 0: selected away, as t - s is NaN where
    # both are absent (-inf - -inf), and 1 / l_t is inf on rows with nothing seen yet. (The
    # interpreter's numpy warns of both. Not computing them costs live values: every variant
    # tried, selecting t and s apart or clamping l_t, spilled 8 bytes under Triton 3.6 on sm_80,
    # 4096-wide chunks on 8 warps.)
    tile = tl.sum(tl.where(w_t > 0.0, (w_t * inv_l_t[:, None]) * (t - s), 0.0), axis=1)
    cross = cross * (l_t_kept * inv_l_t) + tile
    return m_s_new, l_s, m_t_new, l_t, cross


@triton.jit
def merge_kl_stats(m_s, l_s, m_t, l_t, cross):
    """Per-row statistics [R] from those of vocabulary segments [R, S], each as online_kl_update
    leaves them (an empty segment: m = -inf, l = 0, cross = 0): the sums rescaled to the common
    maxima, the means weighted by each segment's share of the teacher's mass."""
    m_s_all = tl.max(m_s, axis=1)
    m_t_all = tl.max(m_t, axis=1)
    shift_s = tl.where(m_s_all == float("-inf"), 0.0, m_s_all)
    shift_t = tl.where(m_t_all == float("-inf"), 0.0, m_t_all)
    l_s_all = tl.sum(l_s * tl.exp2(m_s - shift_s[:, None]), axis=1)
    mass_t = l_t * tl.exp2(m_t - shift_t[:, None])
    l_t_all = tl.sum(mass_t, axis=1)
    # A segment whose teacher mass rounds to 0 adds 0, even when its mean is infinite.
    weighted = tl.where(mass_t > 0.0, cross, 0.0) * mass_t
    cross_all = tl.sum(weighted, axis=1) / tl.maximum(l_t_all, 1.0)  # l_t_all is 0 or >= 1
    return m_s_all, l_s_all, m_t_all, l_t_all, cross_all


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
def _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, lo, hi, c_begin, c_end, lse_s, lse_t, row_scale,
                             scale2, BLOCK_V: tl.constexpr):
    """Columns [c_begin, c_end) of d student: row_scale * (p_s - p_t) inside [lo, hi), 0 outside
    (so the output needs no memset)."""
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        in_slice = (cols >= lo) & (cols < hi)
        ld = alive[:, None] & in_slice[None, :]
        s = tl.load(s_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        t = tl.load(t_row + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32) * scale2
        d = kl_grad_tile(s, t, lse_s * LOG2E_K, lse_t * LOG2E_K, row_scale, alive)
        tl.store(d_row + cols[None, :], d.to(d_row.dtype.element_ty), mask=ok[:, None] & (cols < c_end)[None, :])


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
                      n_rows, n_cols, lo, hi, split_cols, stride_s, stride_t, stride_d, scale2, temperature,
                      HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Writes d student = T * (p_s - p_t) * grad from the saved logsumexps, over the columns
    [j * split_cols, (j + 1) * split_cols) of whole rows, j = program_id(1). Pointers are at
    column 0; n_cols is the full vocab."""
    c_begin = tl.program_id(1) * split_cols
    c_end = tl.minimum(n_cols, c_begin + split_cols)
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
        _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, lo, hi, c_begin, c_end, lse_s, lse_t, row_scale,
                                 scale2, BLOCK_V)


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
        _write_row_block_dlogits(s_row, t_row, d_row, ok, alive, 0, n_cols, 0, n_cols, lse_s, lse_t, row_scale,
                                 scale2, BLOCK_V)


@triton.jit
def _kd_kl_partial_stats_kernel(student_ptr, teacher_ptr, mask_ptr, stats_ptr, n_rows, lo, hi, split_cols, n_splits,
                                stride_s, stride_t, scale2,
                                HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """The running statistics of each row over one segment of the slice: segment j = program_id(1)
    is [lo, hi) within [(lo // split_cols + j) * split_cols, ... + split_cols) (so segments start on
    chunk boundaries). Written to stats [N_STATS, n_rows, n_splits], float32."""
    first = lo // split_cols + tl.program_id(1)
    seg_lo = tl.maximum(lo, first * split_cols)
    seg_hi = tl.minimum(hi, (first + 1) * split_cols)
    plane = n_rows * n_splits
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        s_row = student_ptr + rows.to(tl.int64)[:, None] * stride_s
        t_row = teacher_ptr + rows.to(tl.int64)[:, None] * stride_t
        m_s, l_s, m_t, l_t, cross = _row_block_stats(s_row, t_row, live, seg_lo, seg_hi - seg_lo, scale2, BLOCK_R,
                                                     BLOCK_V)
        out = stats_ptr + rows * n_splits + tl.program_id(1)
        tl.store(out, m_s, mask=ok)
        tl.store(out + plane, l_s, mask=ok)
        tl.store(out + 2 * plane, m_t, mask=ok)
        tl.store(out + 3 * plane, l_t, mask=ok)
        tl.store(out + 4 * plane, cross, mask=ok)


@triton.jit
def _kd_kl_merge_kernel(stats_ptr, mask_ptr, loss_ptr, lse_s_ptr, lse_t_ptr, n_rows, n_splits, temperature,
                        HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr):
    """Loss and logsumexps of each row from its segments' statistics (SPLITS >= n_splits)."""
    splits = tl.arange(0, SPLITS)
    plane = n_rows * n_splits
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        at = stats_ptr + rows[:, None] * n_splits + splits[None, :]
        ld = ok[:, None] & (splits < n_splits)[None, :]
        m_s = tl.load(at, mask=ld, other=float("-inf"))
        l_s = tl.load(at + plane, mask=ld, other=0.0)
        m_t = tl.load(at + 2 * plane, mask=ld, other=float("-inf"))
        l_t = tl.load(at + 3 * plane, mask=ld, other=0.0)
        cross = tl.load(at + 4 * plane, mask=ld, other=0.0)
        m_s, l_s, m_t, l_t, cross = merge_kl_stats(m_s, l_s, m_t, l_t, cross)
        alive = live & (m_t > float("-inf"))
        loss, lse_s, lse_t = kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature)
        tl.store(loss_ptr + rows, loss, mask=ok)
        tl.store(lse_s_ptr + rows, lse_s, mask=ok)
        tl.store(lse_t_ptr + rows, lse_t, mask=ok)


# ----------------------------------------------------------------------------- tuning
# (BLOCK_R, BLOCK_V, num_warps, num_stages): several short rows per program for small slices
# (topk), one long row per program for big ones. Multi-row tiles cost many registers (16 x 64
# uses ~150 on sm_80; 32 x 64 with 4 warps spills), hence no bigger ones.
_CONFIGS = [(16, 64, 4, 2), (8, 256, 8, 2), (2, 1024, 8, 2), (1, 2048, 4, 2), (1, 4096, 8, 2), (1, 8192, 8, 2)]
# The split's statistics pass: the same, but 4096-wide chunks on 4 warps (on 8, Triton 3.6 spills
# 8 bytes on sm_80 with float32 logits: ptxas holds that kernel to 64 registers).
_PARTIAL_CONFIGS = [(1, 4096, 4, 2) if c[:2] == (1, 4096) else c for c in _CONFIGS]
_INTERPRET_CONFIGS = [(4, 128, 4, 1)]  # the interpreter is slow; one small config covers chunking
# The merge pass holds [BLOCK_R, SPLITS] of each statistic: MERGE_TILE entries, 4 warps.
MERGE_TILE = 1024
MERGE_WARPS = 4

# The split over the vocabulary (module docstring). Long rows run one row per program, so a
# launch has about as many programs as rows: below PROGRAMS_PER_SM per SM the slice is cut into
# segments of at least MIN_SPLIT_COLS columns (a power of two, so segments start on chunk
# boundaries), about MAX_SPLITS at most.
PROGRAMS_PER_SM = 4
MIN_SPLIT_COLS = 1024
MAX_SPLITS = 64


def _configs(table):
    return [triton.Config({"BLOCK_R": r, "BLOCK_V": v}, num_warps=w, num_stages=st)
            for r, v, w, st in (_INTERPRET_CONFIGS if INTERPRET else table)]


def _prune(configs, named_args, **kwargs):
    """Keep the three configs with the largest chunk that does not overshoot the columns one
    program sweeps (the slice, or a segment of it)."""
    cols = min(named_args[k] for k in ("n_cols", "split_cols") if k in named_args)
    width = max(64, triton.next_power_of_2(cols))
    fits = sorted((c for c in configs if c.kwargs["BLOCK_V"] <= width), key=lambda c: -c.kwargs["BLOCK_V"])
    return fits[:3] or configs[:1]


def _autotuned(kernel, key, table=_CONFIGS):
    return triton.autotune(_configs(table), key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


_kd_kl_fwd = _autotuned(_kd_kl_fwd_kernel, ["n_cols"])
_kd_kl_bwd = _autotuned(_kd_kl_bwd_kernel, ["n_cols", "split_cols"])
_kd_kl_fwd_bwd = _autotuned(_kd_kl_fwd_bwd_kernel, ["n_cols"])
_kd_kl_partial_stats = _autotuned(_kd_kl_partial_stats_kernel, ["split_cols"], _PARTIAL_CONFIGS)


def n_segments(lo: int, hi: int, split_cols: int) -> int:
    """Segments of the slice [lo, hi) cut at the multiples of split_cols."""
    return triton.cdiv(hi, split_cols) - lo // split_cols


def vocab_split_cols(n_rows: int, lo: int, hi: int, n_sms: int) -> int:
    """Columns per segment when n_rows rows of the slice [lo, hi) are split over the vocabulary on
    a GPU with n_sms SMs; 0 for no split (enough rows to fill it, or a slice too short to cut)."""
    target = PROGRAMS_PER_SM * n_sms
    if n_rows == 0 or n_rows >= target:
        return 0
    n_cols = hi - lo
    enough = triton.cdiv(n_cols, triton.cdiv(target, n_rows))  # the widest segments that reach the target
    cols = max(MIN_SPLIT_COLS, 1 << (enough.bit_length() - 1), triton.next_power_of_2(triton.cdiv(n_cols, MAX_SPLITS)))
    return cols if n_segments(lo, hi, cols) > 1 else 0


def split_bytes_per_row(n_cols: int) -> int:
    """Scratch per row of a row pass over n_cols columns if it is split, at most: the segments'
    statistics and two logsumexps (0 for a slice too short to split)."""
    if n_cols <= MIN_SPLIT_COLS:
        return 0
    return 4 * (N_STATS * min(MAX_SPLITS, triton.cdiv(n_cols, MIN_SPLIT_COLS)) + N_STATS + 2)


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


def _grid(meta, n_rows, n_splits=1):
    return (max(1, min(triton.cdiv(n_rows, meta["BLOCK_R"]), MAX_GRID)), n_splits)


def _split_forward(student, teacher, mask, loss, lse_s, lse_t, temperature, lo, hi, split_cols):
    """loss, lse_s, lse_t of the slice [lo, hi) split over the vocabulary: per-segment statistics,
    then their merge."""
    n_rows = student.shape[0]
    n_splits = n_segments(lo, hi, split_cols)
    stats = torch.empty(N_STATS, n_rows, n_splits, dtype=torch.float32, device=student.device)
    mask_arg = loss if mask is None else mask
    _kd_kl_partial_stats[lambda meta: _grid(meta, n_rows, n_splits)](
        student, teacher, mask_arg, stats, n_rows, lo, hi, split_cols, n_splits, student.stride(0),
        teacher.stride(0), LOG2E / temperature, HAS_MASK=mask is not None)
    splits = triton.next_power_of_2(n_splits)
    block_r = max(1, MERGE_TILE // splits)
    _kd_kl_merge_kernel[(max(1, min(triton.cdiv(n_rows, block_r), MAX_GRID)),)](
        stats, mask_arg, loss, lse_s, lse_t, n_rows, n_splits, float(temperature), HAS_MASK=mask is not None,
        BLOCK_R=block_r, SPLITS=splits, num_warps=MERGE_WARPS)


def _backward(grad_rows, student, teacher, mask, lse_s, lse_t, d_student, temperature, lo, hi):
    """d student over whole rows, split over the columns when the rows are few."""
    n_rows, n_cols = student.shape
    split_cols = vocab_split_cols(n_rows, 0, n_cols, sm_count(student.device)) or n_cols
    _kd_kl_bwd[lambda meta: _grid(meta, n_rows, triton.cdiv(n_cols, split_cols))](
        grad_rows, student, teacher, lse_s if mask is None else mask, lse_s, lse_t, d_student,
        n_rows, n_cols, lo, hi, split_cols, student.stride(0), teacher.stride(0), d_student.stride(0),
        LOG2E / temperature, float(temperature), HAS_MASK=mask is not None)


def kd_kl_forward(student, teacher, mask, options: KdOptions) -> KdKlRows:
    """student, teacher: [P, V]; mask: bool [P] or None. Returns float32 (loss, lse_s, lse_t), each [P]."""
    temperature, lo, hi = options.temperature, options.lo, options.hi
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    student, teacher = unit_stride_rows(student), unit_stride_rows(teacher)
    n_rows = student.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    if n_rows == 0:
        return KdKlRows(loss, lse_s, lse_t)
    mask = None if mask is None else mask.contiguous()
    split_cols = vocab_split_cols(n_rows, lo, hi, sm_count(student.device))
    if split_cols:
        _split_forward(student, teacher, mask, loss, lse_s, lse_t, temperature, lo, hi, split_cols)
        return KdKlRows(loss, lse_s, lse_t)
    _kd_kl_fwd[lambda meta: _grid(meta, n_rows)](
        student, teacher, loss if mask is None else mask, loss, lse_s, lse_t,
        n_rows, hi - lo, lo, student.stride(0), teacher.stride(0), LOG2E / temperature, float(temperature),
        HAS_MASK=mask is not None)
    return KdKlRows(loss, lse_s, lse_t)


def kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t, options: KdOptions):
    """d loss / d student [P, V] in the student's dtype (zero outside [lo, hi))."""
    temperature, lo, hi = options.temperature, options.lo, options.hi
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    d_student = like_with_unit_stride_rows(student)
    student, teacher = unit_stride_rows(student), unit_stride_rows(teacher)
    n_rows, n_cols = student.shape
    if n_rows == 0 or n_cols == 0:
        return d_student
    _backward(grad_rows.contiguous(), student, teacher, None if mask is None else mask.contiguous(),
              lse_s.contiguous(), lse_t.contiguous(), d_student, temperature, lo, hi)
    return d_student


def kd_kl_forward_backward(grad_rows, student, teacher, mask, temperature, d_student):
    """The loss rows (float32 [P]) of whole rows of student, teacher [P, n] (no slice), and
    d loss / d student with grad_rows as the rows' output gradients, written into d_student
    ([P, n], any dtype and row stride). Few rows: the split forward, then the split backward."""
    check_triton_dtype(student, "student")
    check_triton_dtype(teacher, "teacher")
    n_rows, n_cols = student.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss
    grad_rows = grad_rows.contiguous()
    mask = None if mask is None else mask.contiguous()
    split_cols = vocab_split_cols(n_rows, 0, n_cols, sm_count(student.device))
    if split_cols:
        lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
        _split_forward(student, teacher, mask, loss, lse_s, lse_t, temperature, 0, n_cols, split_cols)
        _backward(grad_rows, student, teacher, mask, lse_s, lse_t, d_student, temperature, 0, n_cols)
        return loss
    _kd_kl_fwd_bwd[lambda meta: _grid(meta, n_rows)](
        grad_rows, student, teacher, loss if mask is None else mask, loss, d_student,
        n_rows, n_cols, student.stride(0), teacher.stride(0), d_student.stride(0),
        LOG2E / temperature, float(temperature), HAS_MASK=mask is not None)
    return loss
