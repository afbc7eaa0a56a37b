"""Triton fused-linear KD loss: T^2 * KL(softmax(ht wt^T / T) || softmax(hs ws^T / T)) per row,
with the [positions, V] logits never materialised.

Forward (flash-attention shape): each program owns BLOCK_P positions (the "queries") and
loops over tiles of BLOCK_V vocab rows of the weights (the "keys"). A tile's student and
teacher logits come from tl.dot over H in float32 accumulators and go straight into the
online statistics shared with the logits kernel (mode_kernels.triton.kd_kl). Only the two
logsumexps per position are kept.

Backward: the logits are recomputed tile by tile from the saved logsumexps, for one chunk of
positions at a time (at most DLOGITS_CHUNK_ELEMENTS entries), giving that chunk's
d logits = T (p_s - p_t) grad. Then
    d hidden[chunk] = d logits @ W                  (written once, hidden's dtype)
    d weight       += d logits^T @ hidden[chunk]     (a float32 buffer, when need_dw)
by a tiled tl.dot kernel with float32 accumulation.

Why a d-logits chunk instead of accumulating d hidden / d weight inside the recompute kernel:
H is large (4096), so a [positions, H] or [vocab, H] accumulator cannot live in registers
across the loop over the other dimension; that leaves fp32 atomics (CCE's choice) at
(1/BLOCK_P + 1/BLOCK_V) * P * V * H atomic adds, nondeterministic, or this chunk. The chunk
costs one bounded buffer and no atomics, is deterministic, and runs the two gradient GEMMs as
plain tensor-core GEMMs. In MoDE the lm_head is frozen (need_dw False), so the common case has
no float32 weight buffer at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, MAX_GRID
from .kd_kl import (
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

# Bound on the entries of one backward d-logits chunk (2^26: 128 MiB in bf16)...
DLOGITS_CHUNK_ELEMENTS = 1 << 26
# and on its positions, so the d-logits grid's second dimension stays far below MAX_GRID.
MAX_CHUNK_ROWS = 1 << 16


# ----------------------------------------------------------------------------- kernels
@triton.jit
def logit_tiles(hs_ptr, ht_ptr, ws_ptr, wt_ptr, rows, vocab, n_rows, n_vocab, H,
                stride_hs, stride_ht, stride_ws, stride_wt, scale2,
                SHARED_WEIGHT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Student and teacher logits of the tile (rows, vocab), float32, in base-2 units
    (x log2(e) / T), -inf on vocab entries past n_vocab."""
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
        k_ok = ks < H
        hs = tl.load(hs_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        ht = tl.load(ht_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        ws = tl.load(ws_rows + ks[None, :], mask=vocab_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        if SHARED_WEIGHT:
            wt = ws  # teacher_weight None: one weight tile serves both dots
        else:
            wt = tl.load(wt_rows + ks[None, :], mask=vocab_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc_s = tl.dot(hs, tl.trans(ws), acc_s, input_precision=DOT_PRECISION)
        acc_t = tl.dot(ht, tl.trans(wt), acc_t, input_precision=DOT_PRECISION)
    s = tl.where(vocab_ok[None, :], acc_s * scale2, float("-inf"))
    t = tl.where(vocab_ok[None, :], acc_t * scale2, float("-inf"))
    return s, t


@triton.jit
def _fused_fwd_kernel(hs_ptr, ht_ptr, ws_ptr, wt_ptr, mask_ptr, loss_ptr, lse_s_ptr, lse_t_ptr,
                      n_rows, n_vocab, H, stride_hs, stride_ht, stride_ws, stride_wt, scale2, temperature,
                      HAS_MASK: tl.constexpr, SHARED_WEIGHT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Each program owns blocks of BLOCK_P positions (grid-strided) and sweeps the vocab slice
    (ws_ptr/wt_ptr point at row lo) in BLOCK_V tiles."""
    for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_P), tl.num_programs(0)):
        rows = block * BLOCK_P + tl.arange(0, BLOCK_P)
        live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
        m_s = tl.full([BLOCK_P], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_P], tl.float32)
        l_t = tl.zeros([BLOCK_P], tl.float32)
        cross = tl.zeros([BLOCK_P], tl.float32)
        for v0 in range(0, n_vocab, BLOCK_V):
            vocab = v0 + tl.arange(0, BLOCK_V)
            s, t = logit_tiles(hs_ptr, ht_ptr, ws_ptr, wt_ptr, rows, vocab, n_rows, n_vocab, H,
                               stride_hs, stride_ht, stride_ws, stride_wt, scale2,
                               SHARED_WEIGHT, DOT_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_V, BLOCK_H)
            m_s, l_s, m_t, l_t, cross = online_kl_update(s, t, m_s, l_s, m_t, l_t, cross)
        alive = live & (m_t > float("-inf"))
        loss, lse_s, lse_t = kl_finish(m_s, l_s, m_t, l_t, cross, alive, temperature)
        ok = rows < n_rows
        tl.store(loss_ptr + rows, loss, mask=ok)
        tl.store(lse_s_ptr + rows, lse_s, mask=ok)
        tl.store(lse_t_ptr + rows, lse_t, mask=ok)


@triton.jit
def _fused_dlogits_kernel(hs_ptr, ht_ptr, ws_ptr, wt_ptr, mask_ptr, grad_rows_ptr, lse_s_ptr, lse_t_ptr,
                          dlogits_ptr, n_rows, n_vocab, H, stride_hs, stride_ht, stride_ws, stride_wt, stride_dl,
                          scale2, temperature,
                          HAS_MASK: tl.constexpr, SHARED_WEIGHT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One (vocab tile, position block) of d logits = T (p_s - p_t) grad, recomputed from the
    saved logsumexps. Grid: (vocab tiles, position blocks of the chunk)."""
    vocab = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = rows < n_rows
    live = load_live_rows(mask_ptr, rows, n_rows, HAS_MASK)
    s, t = logit_tiles(hs_ptr, ht_ptr, ws_ptr, wt_ptr, rows, vocab, n_rows, n_vocab, H,
                       stride_hs, stride_ht, stride_ws, stride_wt, scale2,
                       SHARED_WEIGHT, DOT_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_V, BLOCK_H)
    lse_s2 = tl.load(lse_s_ptr + rows, mask=ok, other=0.0) * LOG2E_K
    lse_t2 = tl.load(lse_t_ptr + rows, mask=ok, other=0.0) * LOG2E_K
    row_scale = temperature * tl.load(grad_rows_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    d = kl_grad_tile(s, t, lse_s2, lse_t2, row_scale, live)
    tl.store(dlogits_ptr + rows.to(tl.int64)[:, None] * stride_dl + vocab[None, :],
             d.to(dlogits_ptr.dtype.element_ty), mask=ok[:, None] & (vocab < n_vocab)[None, :])


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
# Configs per dot-operand width in bytes: (block sizes..., num_warps, num_stages). The logit
# kernels hold two float32 accumulator tiles; float32 operands run 3xTF32, which splits each
# operand in two, so they take thinner K blocks. All are spill-free on sm_80 and sm_90
# (python -m mode_kernels.tools.compile_check); bigger tiles spill.
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


def _tile_autotune(kernel):
    return triton.autotune(_autotune_configs(_TILE_NAMES, _TILE_CONFIGS, _INTERPRET_TILE), key=["n_vocab", "H"],
                           prune_configs_by={"early_config_prune": _pruner(_TILE_NAMES, _TILE_CONFIGS)})(kernel)


_fused_fwd = _tile_autotune(_fused_fwd_kernel)
# The d-logits kernel overwrites its output and is idempotent, so autotuning may rerun it.
_fused_dlogits = _tile_autotune(_fused_dlogits_kernel)
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


def fused_linear_kd_kl_forward(hs, ht, ws, wt, mask, temperature, lo, hi):
    """hs, ht: [P, H]; ws, wt: [V, H] (wt None means ws). Returns float32 (loss, lse_s, lse_t), each [P]."""
    _check(hs, ht, ws, wt)
    hs, ht, ws = unit_stride_rows(hs), unit_stride_rows(ht), unit_stride_rows(ws)
    wt_slice = ws[lo:hi] if wt is None else unit_stride_rows(wt)[lo:hi]
    n_rows, H = hs.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=hs.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    if n_rows == 0:
        return loss, lse_s, lse_t
    dot = _dot_args(_operand_dtype(hs, ht, ws, wt_slice))
    _fused_fwd[lambda meta: (max(1, min(triton.cdiv(n_rows, meta["BLOCK_P"]), MAX_GRID)),)](
        hs, ht, ws[lo:hi], wt_slice, loss if mask is None else mask.contiguous(), loss, lse_s, lse_t,
        n_rows, hi - lo, H, hs.stride(0), ht.stride(0), ws.stride(0), wt_slice.stride(0),
        LOG2E / temperature, float(temperature),
        HAS_MASK=mask is not None, SHARED_WEIGHT=wt is None, **dot)
    return loss, lse_s, lse_t


def fused_linear_kd_kl_backward(grad_rows, hs, ht, ws, wt, mask, lse_s, lse_t, temperature, lo, hi, need_dw):
    """(d hs [P, H] in hs's dtype, d ws [V, H] in ws's dtype or None). The teacher is a constant.

    Positions are dead when masked out. (The forward also treats a position whose teacher
    logits are all -inf as dead; with finite hidden states and weights that cannot happen.)"""
    _check(hs, ht, ws, wt)
    d_hs = like_with_unit_stride_rows(hs)
    d_ws = torch.zeros_like(ws) if need_dw else None  # rows outside [lo, hi) get no gradient
    hs, ht, ws = unit_stride_rows(hs), unit_stride_rows(ht), unit_stride_rows(ws)
    wt_slice = ws[lo:hi] if wt is None else unit_stride_rows(wt)[lo:hi]
    ws_slice = ws[lo:hi]
    n_rows, H = hs.shape
    n_vocab = hi - lo
    d_ws_slice = torch.empty(n_vocab, H, dtype=torch.float32, device=ws.device) if need_dw else None
    operand = _operand_dtype(hs, ht, ws, wt_slice)
    dot = _dot_args(operand)
    mask = None if mask is None else mask.contiguous()
    grad_rows, lse_s, lse_t = grad_rows.contiguous(), lse_s.contiguous(), lse_t.contiguous()
    chunk = max(1, min(n_rows, MAX_CHUNK_ROWS, DLOGITS_CHUNK_ELEMENTS // max(n_vocab, 1)))
    # 16-bit d logits, like the naive path's, feed the tensor-core GEMMs; float32 inputs keep float32.
    # (They include grad_rows: with float16 and a mean over many positions the smallest entries
    # go subnormal, as in the naive float16 path's gradient of the logits.)
    # Rows padded to 16 entries keep the GEMMs' loads of d logits aligned for any slice width.
    dlogits = torch.empty(chunk, triton.cdiv(n_vocab, 16) * 16, dtype=operand, device=hs.device)[:, :n_vocab]
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        dl = dlogits[: r1 - r0]
        rows = r1 - r0

        def grid(meta, rows=rows):
            return triton.cdiv(n_vocab, meta["BLOCK_V"]), triton.cdiv(rows, meta["BLOCK_P"])

        _fused_dlogits[grid](
            hs[r0:r1], ht[r0:r1], ws_slice, wt_slice, lse_s if mask is None else mask[r0:r1], grad_rows[r0:r1],
            lse_s[r0:r1], lse_t[r0:r1], dl, r1 - r0, n_vocab, H,
            hs.stride(0), ht.stride(0), ws.stride(0), wt_slice.stride(0), dl.stride(0),
            LOG2E / temperature, float(temperature),
            HAS_MASK=mask is not None, SHARED_WEIGHT=wt is None, **dot)
        matmul(dl, ws_slice, d_hs[r0:r1], accumulate=False)
        if need_dw:
            matmul(dl.t(), hs[r0:r1], d_ws_slice, accumulate=r0 > 0)
    if need_dw:
        d_ws[lo:hi] = d_ws_slice
    return d_hs, d_ws
