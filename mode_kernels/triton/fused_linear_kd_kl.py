"""Triton fused-linear KD loss: T^2 * KL(softmax(ht wt^T / T) || softmax(hs ws^T / T)) per row,
with the [positions, V] logits never materialised, and its gradients in the same pass.

Positions are processed in chunks sized by the memory bound (``mode_kernels.kd_memory``). Per chunk:
1. ``_logits_kernel``: both logits tiles by tl.dot over H (float32 accumulators), stored as
   float32 [chunk, n] (float32 keeps the gradient exact where 16-bit logits would not: Liger's
   issue 1432). The grid covers (row blocks x vocab tiles), so there is parallelism over the
   vocabulary even when a chunk has few positions, in groups of GROUP_P row blocks that sweep the
   vocab tiles together: a weight tile is read from HBM once per group while the group's hidden
   rows stay in L2.
2. One row pass (``kd_kl_forward_backward``, shared with the logits op): online logsumexps and KL,
   then d logits = T * w * (p_s - p_t) in the dots' 16-bit dtype (w: the row's weight in the
   reduction, or its output gradient). A chunk of few positions runs the row pass split over the
   vocabulary (see mode_kernels.triton.kd_kl).
3. ``_matmul_kernel``: d hidden[chunk] = d logits @ W, and d W[slice] += d logits^T @ hidden[chunk]
   (float32, when the weight is trainable).
So a frozen weight costs three GEMM-sized products (student logits, teacher logits, d hidden),
nothing is recomputed, and the loss's backward only scales the gradients by its output gradient.
Without gradients (evaluation, or the forward of reduction "none", whose backward reruns this
with the output gradients as row weights) step 2 is the logits op's forward and step 3 is skipped.

With top-k the teacher's selection and the given-teacher form run instead (mode_kernels.triton.kd_topk).

Why chunks of d logits instead of accumulating d hidden / d weight inside the logits kernel:
H is large (4096), so a [positions, H] or [vocab, H] accumulator cannot live in registers
across the loop over the other dimension; that leaves fp32 atomics (CCE's choice),
nondeterministic, or this chunk, which runs the two gradient GEMMs as plain tensor-core GEMMs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import FusedLinearKdKlNeeds, FusedLinearKdKlResult, KdOptions, TeacherTopk
from ..kd_memory import chunk_rows
from ._common import INTERPRET, MAX_GRID
from .kd_kl import (
    check_triton_dtype,
    kd_kl_forward,
    kd_kl_forward_backward,
    like_with_unit_stride_rows,
    split_bytes_per_row,
    unit_stride_rows,
)

# Chunks of positions are a multiple of the largest row tile (the last one aside), so no GEMM
# tile runs half empty.
CHUNK_ALIGN = 128
# Row blocks of a group in the logits kernel's tile order (see the module docstring).
GROUP_P = 8


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logits_kernel(hs_ptr, ht_ptr, ws_ptr, wt_ptr, s_ptr, t_ptr, d_ptr, n_rows, n_vocab, H,
                   stride_hs, stride_ht, stride_ws, stride_wt, stride_out, stride_d,
                   TEACHER: tl.constexpr, ZERO_D: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   GROUP_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Student and teacher logits hs ws^T, ht wt^T of a chunk, float32 [n_rows, n_vocab] each
    (ws_ptr/wt_ptr point at row lo of the weights); the student's only without TEACHER, and with ZERO_D
    zeros over d [n_rows, n_vocab] too (the top-k row pass scatters into it: mode_kernels.triton.kd_topk).
    Tiles are grid-strided in grouped order."""
    n_row_blocks = tl.cdiv(n_rows, BLOCK_P)
    n_vocab_tiles = tl.cdiv(n_vocab, BLOCK_V)
    tiles_per_group = GROUP_P * n_vocab_tiles
    for tile in range(tl.program_id(0), n_row_blocks * n_vocab_tiles, tl.num_programs(0)):
        first = tile // tiles_per_group * GROUP_P
        group_size = tl.minimum(n_row_blocks - first, GROUP_P)
        in_group = tile % tiles_per_group
        rows = (first + in_group % group_size) * BLOCK_P + tl.arange(0, BLOCK_P)
        vocab = in_group // group_size * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < n_rows
        vocab_ok = vocab < n_vocab
        hs_rows = hs_ptr + rows.to(tl.int64)[:, None] * stride_hs
        ht_rows = ht_ptr + rows.to(tl.int64)[:, None] * stride_ht
        ws_rows = ws_ptr + vocab.to(tl.int64)[:, None] * stride_ws
        wt_rows = wt_ptr + vocab.to(tl.int64)[:, None] * stride_wt
        acc_s = tl.zeros([BLOCK_P, BLOCK_V], tl.float32)
        acc_t = tl.zeros([BLOCK_P, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h_mask = row_ok[:, None] & (ks < H)[None, :]
            w_mask = vocab_ok[:, None] & (ks < H)[None, :]
            hs = tl.load(hs_rows + ks[None, :], mask=h_mask, other=0.0).to(DOT_DTYPE)
            ws = tl.load(ws_rows + ks[None, :], mask=w_mask, other=0.0).to(DOT_DTYPE)
            acc_s = tl.dot(hs, tl.trans(ws), acc_s, input_precision=DOT_PRECISION)
            if TEACHER:
                ht = tl.load(ht_rows + ks[None, :], mask=h_mask, other=0.0).to(DOT_DTYPE)
                if SHARED_WEIGHT:
                    wt = ws  # teacher_weight None: one weight tile serves both dots
                else:
                    wt = tl.load(wt_rows + ks[None, :], mask=w_mask, other=0.0).to(DOT_DTYPE)
                acc_t = tl.dot(ht, tl.trans(wt), acc_t, input_precision=DOT_PRECISION)
        out = rows.to(tl.int64)[:, None] * stride_out + vocab[None, :]
        out_mask = row_ok[:, None] & vocab_ok[None, :]
        tl.store(s_ptr + out, acc_s, mask=out_mask)
        if TEACHER:
            tl.store(t_ptr + out, acc_t, mask=out_mask)
        if ZERO_D:
            d_out = rows.to(tl.int64)[:, None] * stride_d + vocab[None, :]
            tl.store(d_ptr + d_out, tl.zeros([BLOCK_P, BLOCK_V], d_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b (c += a @ b when ACCUMULATE), float32 accumulation, stored in c's dtype.
    Strides make transposes free (d weight uses d logits^T)."""
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = a_ptr + ms.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + ns.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak, mask=(ms < M)[:, None] & (ks < K)[None, :],
                    other=0.0).to(DOT_DTYPE)
        b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=(ks < K)[:, None] & (ns < N)[None, :],
                    other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    c_ptrs = c_ptr + ms.to(tl.int64)[:, None] * stride_cm + ns.to(tl.int64)[None, :] * stride_cn
    c_mask = (ms < M)[:, None] & (ns < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------- tuning
# Configs per dot-operand width in bytes: (block sizes..., num_warps, num_stages). The logits
# kernel holds two float32 accumulator tiles; float32 operands run 3xTF32, which splits each
# operand in two, so they take thinner K blocks. All are spill-free on sm_80 and sm_90
# (python -m mode_kernels.tools.compile_check).
_TILE_NAMES = ("BLOCK_P", "BLOCK_V", "BLOCK_H")
_TILE_CONFIGS = {2: [(64, 128, 32, 8, 3), (64, 64, 64, 8, 3)],
                 4: [(64, 64, 16, 8, 2)]}
_MATMUL_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_MATMUL_CONFIGS = {2: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3)],
                   4: [(128, 64, 16, 8, 2), (64, 64, 16, 4, 2)]}
# The interpreter is slow: one small config (still several tiles and H steps on test shapes).
_INTERPRET_TILE = (32, 128, 32, 4, 1)
_INTERPRET_MATMUL = (32, 64, 32, 4, 1)


def _config(names, spec):
    *blocks, warps, stages = spec
    return triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)


def _autotune_configs(names, table, interpret_spec):
    specs = [interpret_spec] if INTERPRET else list(dict.fromkeys(s for width in table for s in table[width]))
    return [_config(names, s) for s in specs]


def _pruner(names, table):
    """Keep the configs listed for the dot operands' width (constexprs arrive as kwargs)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        allowed = table[4 if kwargs["DOT_DTYPE"] == tl.float32 else 2]
        return [c for c in configs
                if tuple(c.kwargs[n] for n in names) + (c.num_warps, c.num_stages) in allowed]
    return prune


# The logits kernel overwrites its outputs and is idempotent, so autotuning may rerun it.
_logits = triton.autotune(_autotune_configs(_TILE_NAMES, _TILE_CONFIGS, _INTERPRET_TILE), key=["n_vocab", "H"],
                          prune_configs_by={"early_config_prune": _pruner(_TILE_NAMES, _TILE_CONFIGS)})(_logits_kernel)
# The accumulating GEMM is not idempotent: autotuning must restore c between trials.
_matmul = triton.autotune(_autotune_configs(_MATMUL_NAMES, _MATMUL_CONFIGS, _INTERPRET_MATMUL),
                          key=["M", "N", "K"], restore_value=["c_ptr"],
                          prune_configs_by={"early_config_prune": _pruner(_MATMUL_NAMES, _MATMUL_CONFIGS)})(
    _matmul_kernel)


# ----------------------------------------------------------------------------- launchers
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _operand_dtype(*tensors) -> torch.dtype:
    """The dtype the dots run in: the inputs' common 16-bit dtype, else float32."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _dot_args(operand: torch.dtype) -> dict:
    """The dots' operand type and precision, as kernel constexprs."""
    # Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly: upcast there (exact,
    # the products of 16-bit values are exact in float32), keep 16-bit dots when compiled.
    # float32 inputs use 3xTF32: tensor cores at about float32 accuracy (plain float32 dots
    # fall back to FMA loops that spill); the precision is ignored for 16-bit operands.
    return {"DOT_DTYPE": tl.float32 if INTERPRET else _TL_DTYPE[operand],
            "DOT_PRECISION": "tf32x3" if operand == torch.float32 else "ieee"}


def _check(hs, ht, ws, wt):
    for t, name in ((hs, "hs"), (ht, "ht"), (ws, "ws")) + (() if wt is None else ((wt, "wt"),)):
        check_triton_dtype(t, name)


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> None:
    """c = a @ b, or c += a @ b, in float32 accumulation; any strides."""
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:
        return
    _matmul[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, **_dot_args(_operand_dtype(a, b)))


def _weight_grad_buffers(ws, lo: int, hi: int, need_dw: bool):
    """(d ws [V, H] zeroed, its float32 accumulator of the slice: a view of it for a float32 weight, else a
    separate [hi - lo, H] buffer), or (None, None). Rows outside [lo, hi) get no gradient."""
    if not need_dw:
        return None, None
    d_ws = torch.zeros_like(ws)
    if ws.dtype == torch.float32:
        return d_ws, d_ws[lo:hi]
    return d_ws, torch.zeros(hi - lo, ws.shape[1], dtype=torch.float32, device=ws.device)


def _input_grads(d, h, ws_slice, d_hs_chunk, d_ws_acc, accumulate: bool) -> None:
    """A chunk's d hs = d logits @ W and d W (+)= d logits^T @ h, each when asked for (not None)."""
    if d_hs_chunk is not None:
        matmul(d, ws_slice, d_hs_chunk, accumulate=False)
    if d_ws_acc is not None:
        matmul(d.t(), h, d_ws_acc, accumulate=accumulate)


def _fused_bytes_per_row(n_pad: int, topk: int | None, operand: torch.dtype) -> int:
    """What one position of a chunk holds, at most: float32 student and teacher logits (with top-k: the
    student's, and the selection's int64 keys where the reference selects) and the d logits (padded rows);
    with top-k also the teacher's ids and values and the gathered logits; with few positions the split row
    pass's scratch."""
    return (n_pad * (8 + operand.itemsize) + (topk or 0) * (16 + operand.itemsize)
            + split_bytes_per_row(topk or n_pad))


def chunk_plan(n_rows: int, n_vocab: int, topk: int | None, dtype: torch.dtype, operand: torch.dtype):
    """(positions per chunk, bytes one position of a chunk holds) for n_rows positions of a slice
    of n_vocab entries, inputs of ``dtype`` and dots in ``operand``: the memory bound's chunk."""
    per_row = _fused_bytes_per_row(padded_width(n_vocab), topk, operand)
    return chunk_rows(n_rows, n_vocab, dtype, per_row, CHUNK_ALIGN), per_row


def padded_width(n_vocab: int) -> int:
    """Rows of the chunk buffers padded to 16 entries stay 16-byte aligned for any slice width."""
    return triton.cdiv(n_vocab, 16) * 16


def _logits_grid(n_rows: int, n_vocab: int):
    def grid(meta):
        return (max(1, min(triton.cdiv(n_rows, meta["BLOCK_P"]) * triton.cdiv(n_vocab, meta["BLOCK_V"]), MAX_GRID)),)
    return grid


def fused_linear_kd_kl(hs, ht, ws, wt, mask, options: KdOptions, row_weight,
                       needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """hs, ht: [P, H]; ws, wt: [V, H] (wt None means ws); mask: bool [P] or None; row_weight: float32 [P]
    (used for the gradients only). Returns (loss float32 [P],
    d hs [P, H] in hs's dtype or None, d ws [V, H] in ws's dtype or None): the gradients of
    sum_p row_weight[p] * loss[p], the teacher a constant.

    Memory beyond the inputs and outputs: one chunk (``_fused_bytes_per_row`` per position), and
    with a trainable 16-bit weight a float32 [hi - lo, H] accumulator of d ws (a float32 weight
    accumulates in place in the output's slice). With top-k: the teacher's selection, then the given form."""
    if options.topk is not None:
        teacher = teacher_topk(ht, ws if wt is None else wt, options, False)
        return fused_linear_kd_kl_given(hs, teacher, ws, mask, options, row_weight, needs)
    temperature, lo, hi = options.temperature, options.lo, options.hi
    need_dh, need_dw = needs
    _check(hs, ht, ws, wt)
    d_hs = like_with_unit_stride_rows(hs) if need_dh else None
    hs, ht, ws = unit_stride_rows(hs), unit_stride_rows(ht), unit_stride_rows(ws)
    ws_slice = ws[lo:hi]
    wt_slice = ws_slice if wt is None else unit_stride_rows(wt)[lo:hi]
    n_rows, H = hs.shape
    n_vocab = hi - lo
    loss = torch.zeros(n_rows, dtype=torch.float32, device=hs.device)
    d_ws, d_ws_acc = _weight_grad_buffers(ws, lo, hi, need_dw)
    if n_rows == 0:
        if need_dw:
            d_ws[lo:hi].zero_()
        return FusedLinearKdKlResult(loss, d_hs, d_ws)
    operand = _operand_dtype(hs, ht, ws, wt_slice)
    dot = _dot_args(operand)
    mask = None if mask is None else mask.contiguous()
    need_grad = need_dh or need_dw
    n_pad = padded_width(n_vocab)
    step = chunk_plan(n_rows, n_vocab, None, hs.dtype, operand)[0]
    logits = torch.empty(2, step, n_pad, dtype=torch.float32, device=hs.device)
    d_buffer = torch.empty(step, n_pad, dtype=operand, device=hs.device) if need_grad else None
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s, t = logits[0, : r1 - r0, :n_vocab], logits[1, : r1 - r0, :n_vocab]
        _logits[_logits_grid(r1 - r0, n_vocab)](
            hs[r0:r1], ht[r0:r1], ws_slice, wt_slice, s, t, s, r1 - r0, n_vocab, H,
            hs.stride(0), ht.stride(0), ws.stride(0), wt_slice.stride(0), s.stride(0), s.stride(0),
            TEACHER=True, ZERO_D=False, SHARED_WEIGHT=wt is None, GROUP_P=GROUP_P, **dot)
        chunk_mask = None if mask is None else mask[r0:r1]
        if not need_grad:
            loss[r0:r1] = kd_kl_forward(s, t, chunk_mask, KdOptions(temperature, 0, s.shape[1])).loss
            continue
        d = d_buffer[: r1 - r0, :n_vocab]
        loss[r0:r1] = kd_kl_forward_backward(row_weight[r0:r1], s, t, chunk_mask, temperature, d)
        _input_grads(d, hs[r0:r1], ws_slice, None if d_hs is None else d_hs[r0:r1], d_ws_acc, r0 > 0)
    if need_dw and ws.dtype != torch.float32:
        d_ws[lo:hi] = d_ws_acc
    return FusedLinearKdKlResult(loss, d_hs, d_ws)


# The top-k forms are this backend's entry points too; mode_kernels.triton.kd_topk builds on the kernels above,
# so it is imported when they are called (either module may be imported first).
def teacher_topk(ht, wt, options: KdOptions, logsumexp: bool) -> TeacherTopk:
    """The teacher's top k per position (``mode_kernels.triton.kd_topk.teacher_topk``)."""
    from . import kd_topk

    return kd_topk.teacher_topk(ht, wt, options, logsumexp)


def fused_linear_kd_kl_given(hs, teacher: TeacherTopk, ws, mask, options: KdOptions, row_weight,
                             needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
    """The loss with the teacher given as its top k (``mode_kernels.triton.kd_topk.fused_linear_kd_kl_given``)."""
    from . import kd_topk

    return kd_topk.fused_linear_kd_kl_given(hs, teacher, ws, mask, options, row_weight, needs)
