"""Triton top-k KD loss on dense student tiles: the teacher's top k selected inside its logits GEMM, and the
loss, the d logits and d hidden of a block of positions in one kernel.

The teacher given as its top k (ids, logits; a cache's, or ``teacher_topk``'s), per chunk of positions:
1. ``_logits_kernel`` (shared with the dense loss, student only): the student's float32 logits of the slice,
   and zeros over the chunk's d logits buffer in the same tiles (clearing it costs no launch).
2. ``_topk_grad_kernel``, one program per (block of positions, block of H columns): the row pass on the k
   student logits gathered at the teacher's ids (the online statistics of ``kd_kl``, so the same numerics as
   the dense row pass), the loss, the d logits scattered into the zeroed buffer, then, after a barrier that
   makes the program's own stores visible to it, d hidden[rows, cols] = d logits[rows] @ W[slice, cols] over
   dense tiles. The programs of one row block all scatter the same values, so none waits for another.
3. With a trainable weight: d W[slice] (+)= d logits^T @ hidden (``matmul``).
So a frozen weight costs two launches per chunk, the dense strategy's two GEMM passes.

The teacher as hidden states: ``teacher_topk`` first, then the given form. ``_select_kernel`` finds the top k
inside the teacher's logits GEMM: each program owns a block of positions and sweeps the slice in tiles of K_PAD (k
rounded up to a power of two, at least 64) columns; each tile's float32 logits become int64 keys ordering them by
value, then by the lower id (``contract.TIES_RULE``, the reference's ``select_topk`` keys), sorted ascending and
merged into the running top K_PAD (sorted descending) by an elementwise maximum, which is bitonic, and one bitonic
merge. No logits leave the kernel: it writes the k ids (ascending) and values, and the logsumexp that the tail
bucket needs. Registers bound K_PAD: above ``MAX_SELECT_K`` the teacher's logits go through ``matmul`` chunk by
chunk and the reference's selection (torch.topk on the same keys).

Cost: the selection's sorts run on CUDA cores, each logit taking part in log2(K_PAD) * (log2(K_PAD) + 3) / 2
compare-exchanges (44 at k 256), beside the 2 H multiply-adds of its GEMM on tensor cores; and a program holds
16 to 32 positions (the keys' registers), so the weight's tiles are re-read from L2 once per 16 to 32 positions
instead of once per 64-row tile group (docs/benchmarks.md estimates what that costs at Anole shapes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, KdOptions, TeacherTopk
from ..reference.kd_kl import select_topk, teacher_logits
from ._common import INTERPRET, MAX_GRID
from .fused_linear_kd_kl import (
    GROUP_P,
    _check,
    _dot_args,
    _logits,
    _logits_grid,
    _operand_dtype,
    _weight_grad_buffers,
    chunk_plan,
    matmul,
    padded_width,
)
from .kd_kl import (
    LN2_K,
    LOG2E,
    LOG2E_K,
    check_triton_dtype,
    kl_finish,
    kl_grad_tile,
    like_with_unit_stride_rows,
    load_live_rows,
    online_kl_update,
    unit_stride_rows,
)

# The largest k the selection kernel keeps in registers (MoDE's 256).
MAX_SELECT_K = 256
# Sort keys below every entry's: the padding of a tile past the slice's end.
PAD_KEY = tl.constexpr(-(2 ** 63))
# Sort keys above every chosen entry's: the entries past k when sorting the chosen ones by id.
LAST_KEY = tl.constexpr(2 ** 63 - 1)
# float32's lowest value: a teacher logit at or below it is masked (-inf), as the reference's teacher_logits.
FLOAT32_MIN = tl.constexpr(torch.finfo(torch.float32).min)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _order_keys(t, vocab, n_vocab):
    """int64 keys of float32 logits t [R, C] at slice ids vocab [C]: larger value, then lower id, is larger.
    The value's bits made order-preserving (-0.0 taken as 0.0, which it equals) in the high half,
    n_vocab - 1 - id in the low half."""
    bits = tl.where(t == 0.0, 0.0, t).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (n_vocab - 1 - vocab).to(tl.int64)[None, :]


@triton.jit
def _select_kernel(ht_ptr, wt_ptr, ids_ptr, values_ptr, lse_ptr, n_rows, n_vocab, H, k, lo,
                   stride_ht, stride_wt, stride_out, lse_scale2,
                   LSE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_P: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """The teacher's top k of the slice per position (wt_ptr points at its row lo): ids (absolute, ascending)
    and float32 values [n_rows, k], and with LSE the logsumexp of logits / T (lse_scale2 = log2(e) / T)."""
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_P), tl.num_programs(0)):
        rows = block * BLOCK_P + tl.arange(0, BLOCK_P)
        row_ok = rows < n_rows
        ht_rows = ht_ptr + rows.to(tl.int64)[:, None] * stride_ht
        top = tl.full([BLOCK_P, K_PAD], PAD_KEY, tl.int64)
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_P], tl.float32)
        for v0 in range(0, n_vocab, K_PAD):
            vocab = v0 + tl.arange(0, K_PAD)
            vocab_ok = vocab < n_vocab
            wt_rows = wt_ptr + vocab.to(tl.int64)[:, None] * stride_wt
            acc = tl.zeros([BLOCK_P, K_PAD], tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                h = tl.load(ht_rows + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :], other=0.0)
                w = tl.load(wt_rows + ks[None, :], mask=vocab_ok[:, None] & (ks < H)[None, :], other=0.0)
                acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
            t = tl.where(acc <= FLOAT32_MIN, float("-inf"), acc)
            ok = row_ok[:, None] & vocab_ok[None, :]
            keys = tl.where(ok, _order_keys(t, vocab, n_vocab), PAD_KEY)
            # top is sorted descending, the tile ascending: their elementwise maximum holds the K_PAD largest
            # of both and is bitonic, so one bitonic merge sorts it.
            top = tl.bitonic_merge(tl.maximum(top, tl.sort(keys)), descending=True)
            if LSE:
                x = tl.where(ok, t * lse_scale2, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_sum = l_sum * tl.exp2(m - shift) + tl.sum(tl.exp2(x - shift[:, None]), axis=1)
                m = m_new
        # The k largest, ordered by id: key (id, value bits), sorted ascending.
        high = (top >> 32).to(tl.int32)
        bits = tl.where(high < 0, high ^ 0x7FFFFFFF, high)
        ids = n_vocab - 1 - top.to(tl.int32)
        chosen = (tl.arange(0, K_PAD) < k)[None, :]
        by_id = tl.sort(tl.where(chosen, (ids.to(tl.int64) << 32) | bits.to(tl.uint32, bitcast=True).to(tl.int64),
                                 LAST_KEY))
        out = rows.to(tl.int64)[:, None] * stride_out + tl.arange(0, K_PAD)[None, :]
        out_ok = row_ok[:, None] & chosen
        tl.store(ids_ptr + out, (by_id >> 32) + lo, mask=out_ok)
        tl.store(values_ptr + out, by_id.to(tl.int32).to(tl.float32, bitcast=True), mask=out_ok)
        if LSE:
            tl.store(lse_ptr + rows, (m + tl.log2(l_sum)) * LN2_K, mask=row_ok)


@triton.jit
def _gathered_logits(ids_ptr, tv_ptr, s_ptr, rows64, sel, lo, n_vocab, stride_ids, stride_tv, stride_s, t_min,
                     scale2, j0, BLOCK_K: tl.constexpr):
    """Columns [j0, j0 + BLOCK_K) of a row block's teacher top k: slice ids, whether each is inside the slice,
    and the student's and the teacher's logits there in base-2 units (-inf where not selected or masked). An id
    outside the slice (the op checks ids on the host, on CUDA only with sync checks on) is never dereferenced:
    its student logit is NaN, so its row's loss and gradients are NaN rather than another row's values."""
    pos = j0 + tl.arange(0, BLOCK_K)[None, :]
    ids = tl.load(ids_ptr + rows64 * stride_ids + pos, mask=sel, other=lo).to(tl.int64) - lo
    in_slice = (ids >= 0) & (ids < n_vocab)
    ids = ids.to(tl.int32)
    t = tl.load(tv_ptr + rows64 * stride_tv + pos, mask=sel, other=float("-inf")).to(tl.float32)
    t = tl.where(t <= t_min, float("-inf"), t) * scale2
    s = tl.load(s_ptr + rows64 * stride_s + ids, mask=sel & in_slice, other=float("-inf")) * scale2
    s = tl.where(sel & ~in_slice, float("nan"), s)
    return ids, in_slice, s, t


@triton.jit
def _topk_grad_kernel(ids_ptr, tv_ptr, s_ptr, d_ptr, w_ptr, dh_ptr, mask_ptr, row_weight_ptr, loss_ptr,
                      n_rows, n_vocab, H, k, lo, stride_ids, stride_tv, stride_s, stride_d, stride_w, stride_dh,
                      t_min, scale2, temperature,
                      HAS_MASK: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_DH: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per block of positions: the loss on the teacher's k (ids absolute, any integer dtype; logits any float
    dtype, entries at or below t_min masked) and the student's float32 logits s [n_rows, n_vocab] gathered
    there, swept in BLOCK_K columns of the k (statistics, then gradients: the second sweep's loads hit the
    cache); with NEED_GRAD the d logits (row_weight * T * (p_s - p_t)) scattered into the zeroed d [n_rows,
    n_vocab]; with NEED_DH then d hidden[:, cols of program_id(1)] = d @ W (w_ptr at the slice's row 0)."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_P), tl.num_programs(0)):
        rows = block * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = rows < n_rows
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        rows64 = rows.to(tl.int64)[:, None]
        m_s = tl.full([BLOCK_P], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_P], tl.float32)
        l_t = tl.zeros([BLOCK_P], tl.float32)
        cross = tl.zeros([BLOCK_P], tl.float32)
        for j0 in range(0, k, BLOCK_K):
            sel = live[:, None] & ((j0 + tl.arange(0, BLOCK_K)) < k)[None, :]
            _, _, s, t = _gathered_logits(ids_ptr, tv_ptr, s_ptr, rows64, sel, lo, n_vocab, stride_ids, stride_tv,
                                          stride_s, t_min, scale2, j0, BLOCK_K)
            m_s, l_s, m_t, l_t, cross = online_kl_update(s, t, m_s, l_s, m_t, l_t, cross)
        alive = live & (m_t > float("-inf"))
        loss, lse_s, lse_t = kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature)
        if tl.program_id(1) == 0:
            tl.store(loss_ptr + rows, loss, mask=ok)
        if NEED_GRAD:
            row_scale = temperature * tl.load(row_weight_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            for j0 in range(0, k, BLOCK_K):
                sel = live[:, None] & ((j0 + tl.arange(0, BLOCK_K)) < k)[None, :]
                ids, in_slice, s, t = _gathered_logits(ids_ptr, tv_ptr, s_ptr, rows64, sel, lo, n_vocab, stride_ids,
                                                       stride_tv, stride_s, t_min, scale2, j0, BLOCK_K)
                # A row with an id outside the slice has a NaN logsumexp, so NaN d logits (and d hidden); the id
                # itself gets none.
                d = kl_grad_tile(s, t, lse_s * LOG2E_K, lse_t * LOG2E_K, row_scale, alive)
                tl.store(d_ptr + rows64 * stride_d + ids, d.to(d_ptr.dtype.element_ty), mask=sel & in_slice)
        if NEED_DH:
            # This program's scattered d logits, read back below, are visible to all its threads after it.
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
            for v0 in range(0, n_vocab, BLOCK_V):
                vocab = v0 + tl.arange(0, BLOCK_V)
                vocab_ok = vocab < n_vocab
                dl = tl.load(d_ptr + rows64 * stride_d + vocab[None, :], mask=ok[:, None] & vocab_ok[None, :],
                             other=0.0)
                w = tl.load(w_ptr + vocab.to(tl.int64)[:, None] * stride_w + cols[None, :],
                            mask=vocab_ok[:, None] & (cols < H)[None, :], other=0.0)
                acc = tl.dot(dl.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
            tl.store(dh_ptr + rows64 * stride_dh + cols[None, :], acc.to(dh_ptr.dtype.element_ty),
                     mask=ok[:, None] & (cols < H)[None, :])


# ----------------------------------------------------------------------------- tuning
def k_pad(k: int) -> int:
    """The selection's tile width for k: a power of two, at least 64 (tl.dot needs 16; every config tried at 16
    and 32 spills on sm_80 or sm_90 under Triton 3.6 or 3.9, and the sorts of 64 columns cost little)."""
    return max(64, triton.next_power_of_2(k))


def select_config(k_padded: int, operand: torch.dtype) -> dict:
    """(BLOCK_P, BLOCK_H, num_warps, num_stages) of ``_select_kernel``: positions per program bounded by the
    keys' registers (two [BLOCK_P, K_PAD] int64 tiles); float32 operands run 3xTF32 in thinner H blocks. Chosen
    spill-free on sm_80 and sm_90 under Triton 3.6 and 3.9 (python -m mode_kernels.tools.compile_check: ptxas
    spills some neighbours of these, e.g. 8 warps at k 64 under 3.9)."""
    if INTERPRET:
        return dict(BLOCK_P=16, BLOCK_H=32, num_warps=4, num_stages=1)
    return dict(BLOCK_P=16 if k_padded >= 256 else 32, BLOCK_H=32 if operand == torch.float32 else 64,
                num_warps=8 if k_padded >= 128 else 4, num_stages=2)


def grad_config(operand: torch.dtype) -> dict:
    """(BLOCK_P, BLOCK_K, BLOCK_V, BLOCK_N, num_warps, num_stages) of ``_topk_grad_kernel``, spill-free as above
    (4 warps spill 8 bytes with 16-bit operands under Triton 3.6 on sm_90, 8 warps with float32 under 3.9, and
    32 columns of the k per sweep some variants under 3.6)."""
    if INTERPRET:
        return dict(BLOCK_P=16, BLOCK_K=16, BLOCK_V=32, BLOCK_N=32, num_warps=4, num_stages=1)
    half = operand != torch.float32
    return dict(BLOCK_P=32, BLOCK_K=16, BLOCK_V=64 if half else 32, BLOCK_N=64, num_warps=8 if half else 4,
                num_stages=2)


def _row_blocks(n_rows: int, block_p: int) -> int:
    return max(1, min(triton.cdiv(n_rows, block_p), MAX_GRID))


# ----------------------------------------------------------------------------- launchers
def teacher_topk(ht, wt, options: KdOptions, logsumexp: bool) -> TeacherTopk:
    """The teacher's top k per position: ``_select_kernel`` in one launch (k up to ``MAX_SELECT_K``), else per
    chunk its float32 logits by ``matmul`` and the reference's ``select_topk``."""
    lo, hi, k = options.lo, options.hi, options.topk
    check_triton_dtype(ht, "ht")
    check_triton_dtype(wt, "wt")
    ht, wt_slice = unit_stride_rows(ht), unit_stride_rows(wt)[lo:hi]
    n_rows, H = ht.shape
    n_vocab = hi - lo
    values = torch.empty(n_rows, k, dtype=torch.float32, device=ht.device)
    index = torch.empty(n_rows, k, dtype=torch.int64, device=ht.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=ht.device) if logsumexp else None
    if n_rows == 0:
        return TeacherTopk(index, values, lse)
    operand = _operand_dtype(ht, wt_slice)
    if k <= MAX_SELECT_K:
        k_padded = k_pad(k)
        config = select_config(k_padded, operand)
        _select_kernel[(_row_blocks(n_rows, config["BLOCK_P"]),)](
            ht, wt_slice, index, values, values if lse is None else lse, n_rows, n_vocab, H, k, lo,
            ht.stride(0), wt_slice.stride(0), index.stride(0), LOG2E / options.temperature,
            LSE=logsumexp, K_PAD=k_padded, **_dot_args(operand), **config)
        return TeacherTopk(index, values, lse)
    step = chunk_plan(n_rows, n_vocab, k, ht.dtype, operand)[0]
    buffer = torch.empty(min(step, n_rows), padded_width(n_vocab), dtype=torch.float32, device=ht.device)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        t = buffer[: r1 - r0, :n_vocab]
        matmul(ht[r0:r1], wt_slice.t(), t, accumulate=False)
        t = teacher_logits(t, torch.float32)
        values[r0:r1], index[r0:r1] = select_topk(t, k)
        if logsumexp:
            lse[r0:r1] = torch.logsumexp(t / options.temperature, dim=-1)
    return TeacherTopk(index.add_(lo), values, lse)


def fused_linear_kd_kl_given(hs, teacher: TeacherTopk, ws, mask, options: KdOptions, row_weight,
                             needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The given-teacher form on dense tiles (a gather of weight rows is not measured faster on a GPU yet), per
    chunk of positions: the student's logits (and the d logits buffer zeroed) by ``_logits_kernel``, then
    ``_topk_grad_kernel`` (loss, d logits, d hidden), then d ws by ``matmul`` when the weight is trainable. The
    tail bucket runs the reference's chunks (torch on the same device)."""
    if options.topk_tail:
        return reference.kd_kl.fused_linear_kd_kl_given(hs, teacher, ws, mask, options, row_weight, needs)
    temperature, lo, hi, k = options.temperature, options.lo, options.hi, options.topk
    need_dh, need_dw = needs
    _check(hs, hs, ws, None)
    d_hs = like_with_unit_stride_rows(hs) if need_dh else None
    hs, ws = unit_stride_rows(hs), unit_stride_rows(ws)
    ids, t_logits = unit_stride_rows(teacher.indices), unit_stride_rows(teacher.logits)
    ws_slice = ws[lo:hi]
    n_rows, H = hs.shape
    n_vocab = hi - lo
    loss = torch.empty(n_rows, dtype=torch.float32, device=hs.device)
    d_ws, d_ws_acc = _weight_grad_buffers(ws, lo, hi, need_dw)
    if n_rows == 0:
        return FusedLinearKdKlResult(loss, d_hs, d_ws)
    operand = _operand_dtype(hs, ws)
    dot = _dot_args(operand)
    mask = None if mask is None else mask.contiguous()
    need_grad = need_dh or need_dw
    config = grad_config(operand)
    n_pad = padded_width(n_vocab)
    step = chunk_plan(n_rows, n_vocab, k, hs.dtype, operand)[0]
    logits = torch.empty(step, n_pad, dtype=torch.float32, device=hs.device)
    d_buffer = torch.empty(step, n_pad, dtype=operand, device=hs.device) if need_grad else logits
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s, d = logits[: r1 - r0, :n_vocab], d_buffer[: r1 - r0, :n_vocab]
        _logits[_logits_grid(r1 - r0, n_vocab)](
            hs[r0:r1], hs[r0:r1], ws_slice, ws_slice, s, s, d, r1 - r0, n_vocab, H,
            hs.stride(0), hs.stride(0), ws.stride(0), ws.stride(0), s.stride(0), d.stride(0),
            TEACHER=False, ZERO_D=need_grad, SHARED_WEIGHT=True, GROUP_P=GROUP_P, **dot)
        d_hs_chunk = d_hs[r0:r1] if need_dh else hs
        grid = (_row_blocks(r1 - r0, config["BLOCK_P"]), triton.cdiv(H, config["BLOCK_N"]) if need_dh else 1)
        _topk_grad_kernel[grid](
            ids[r0:r1], t_logits[r0:r1], s, d, ws_slice, d_hs_chunk, loss if mask is None else mask[r0:r1],
            loss if row_weight is None else row_weight[r0:r1], loss[r0:r1],
            r1 - r0, n_vocab, H, k, lo, ids.stride(0), t_logits.stride(0), s.stride(0), d.stride(0),
            ws.stride(0), d_hs_chunk.stride(0), torch.finfo(t_logits.dtype).min, LOG2E / temperature,
            float(temperature), HAS_MASK=mask is not None, NEED_GRAD=need_grad, NEED_DH=need_dh, **dot, **config)
        if need_dw:
            matmul(d.t(), hs[r0:r1], d_ws_acc, accumulate=r0 > 0)
    if need_dw and ws.dtype != torch.float32:
        d_ws[lo:hi] = d_ws_acc
    return FusedLinearKdKlResult(loss, d_hs, d_ws)
