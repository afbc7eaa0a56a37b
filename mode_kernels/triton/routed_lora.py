"""Triton modality-routed LoRA: y = x W^T + b + scaling * sum_e g_e (u A_e^T) B_e^T, per token's modality.

Same signatures and semantics as ``mode_kernels.reference.routed_lora``. Four kernels:

* ``_shrink_kernel`` (forward): per plan tile (one modality), h = u A_m^T for that modality's
  experts only and the router logits u R_m^T in one K loop, then float32 softmax gates and
  scaling in the epilogue: h' [plan rows, BLOCK_R] float32. Rank columns go in chunks of at
  most 64 (one pass over u each; MoDE's 4 experts x r 8 is one chunk), so registers stay
  bounded up to 16 experts x r 64.
* ``_expand_kernel``: out = a Wt + b + h' L_m (+ dlogit R_m), the base GEMM and the LoRA terms
  in one tile loop and one float32 accumulator, written once. Forward: a = x, Wt = W^T,
  L_m = B_m^T. Backward: a = dy, Wt = W, L_m = A_m, plus the router term.
* ``_shrink_backward_kernel``: recomputes h and the gates, shrinks dy (z = dy B_m) and does the
  gate gradient and the softmax backward in its epilogue: h', dh, dlogit.
* ``_grouped_outer_kernel``: dA, dB, d(router) as per-modality sums over tokens of rank-r
  outer products, split over tokens into float32 partials that torch then sums.

Rows are gathered and scattered through ``plan.order`` inside the kernels (no permuted copy
of x, dy, y or dx); rank-r intermediates live in plan order. Column j of an intermediate is
(local expert j // RANK_P, rank index j % RANK_P), RANK_P = next power of two of r; per-expert
gates reach their columns by a register gather (tl.gather). All grids are
1-D (dim 0 may reach 2^31 - 1), so T up to millions of tokens needs no grid splitting.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..routing import RoutingPlan
from ._common import INTERPRET

# Logits are held 16 wide (the literal 16 in the kernels): the narrowest operand tl.dot accepts.
# Up to 16 experts per modality.
ROUTER_WIDTH = 16
# The shrink kernels walk rank columns in chunks of up to SHRINK_CHUNK, each holding whole experts.
SHRINK_CHUNK = MAX_RANK = 64
# Token splits of the dA/dB/dR reductions: enough programs to fill a GPU, bounded partials.
MAX_SPLITS = 32
TOKENS_PER_SPLIT = 1024


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mma(acc, a, b, DOT_FP32: tl.constexpr, dtype: tl.constexpr):
    """acc += a @ b. Float32 inputs take exact (ieee) products; so does the interpreter, whose
    bf16 tl.dot is wrong (Triton 3.9). Compiled half-precision code keeps tensor-core operands."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(dtype), b.to(dtype), acc)


@triton.jit
def _tile_rows(tiles_ptr, order_ptr, tile_pid, SUB_TILES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of one BLOCK_M slice of a plan tile: (modality, plan positions, token ids, row mask, empty)."""
    tile = tile_pid // SUB_TILES
    modality = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1) + (tile_pid % SUB_TILES) * BLOCK_M
    end = tl.load(tiles_ptr + tile * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M)
    rows = pos < end
    tokens = tl.load(order_ptr + pos, mask=rows, other=0)
    return modality, pos, tokens, rows, start >= end


@triton.jit
def _load_expert_cols(ptr, first_expert, num_experts, j, c, c_limit, stride_e, stride_i, stride_c,
                      RANK: tl.constexpr, RANK_P: tl.constexpr):
    """Load a modality's stacked expert matrices at column j = (expert, rank index) and index c.

    j and c are broadcastable index tensors; their shapes decide the tile's orientation.
    """
    expert = j // RANK_P
    rank = j % RANK_P
    mask = (expert < num_experts) & (rank < RANK) & (c < c_limit)
    offs = (first_expert + expert) * stride_e + rank * stride_i + c * stride_c
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _shrink_chunk(u_rows, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re, stride_rk,
                  first_expert, num_experts, c0, K, DOT_FP32: tl.constexpr, WITH_LOGITS: tl.constexpr,
                  RANK: tl.constexpr, RANK_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """h = u A_m^T over rank columns [c0, c0 + CHUNK) and, WITH_LOGITS, logits = u R_m^T [BLOCK_M, 16]:
    one pass over the tile's rows of u."""
    dtype = u_rows.dtype.element_ty
    j = c0 + tl.arange(0, CHUNK)[None, :]
    e = tl.arange(0, 16)[None, :]
    # A modality with one expert has gate 1: its router row is never read.
    router_cols = e < tl.where(num_experts > 1, num_experts, 0)
    h = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    logits = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_rows + k[None, :] * stride_uk, mask=k[None, :] < K, other=0.0)
        a = _load_expert_cols(a_ptr, first_expert, num_experts, j, k[:, None], K, stride_ae, stride_ar,
                              stride_ak, RANK, RANK_P)
        h = _mma(h, u, a, DOT_FP32, dtype)
        if WITH_LOGITS:
            r = tl.load(router_ptr + (first_expert + e) * stride_re + k[:, None] * stride_rk,
                        mask=router_cols & (k[:, None] < K), other=0.0)
            logits = _mma(logits, u, r, DOT_FP32, dtype)
    return h, logits


@triton.jit
def _gates(logits, num_experts):
    """Float32 softmax over the modality's experts, [BLOCK_M, 16] (zero past num_experts)."""
    valid = tl.arange(0, 16)[None, :] < num_experts
    z = tl.where(valid, logits, float("-inf"))
    p = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    return tl.where(num_experts > 1, p, valid.to(tl.float32))


@triton.jit
def _spread(per_expert, c0, CHUNK: tl.constexpr, RANK_P: tl.constexpr):
    """[BLOCK_M, CHUNK]: per_expert[:, (c0 + j) // RANK_P] for the rank columns c0 + j (a register gather)."""
    j = c0 + tl.arange(0, CHUNK)
    index = tl.zeros((per_expert.shape[0], CHUNK), dtype=tl.int32) + (j // RANK_P)[None, :]
    return tl.gather(per_expert, index, 1)


@triton.jit
def _collect(per_column, c0, CHUNK: tl.constexpr, RANK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, 16]: per expert e, the sum of per_column over e's rank columns in [c0, c0 + CHUNK)."""
    EXPERTS: tl.constexpr = CHUNK // RANK_P
    sums = tl.sum(tl.reshape(per_column, (BLOCK_M, EXPERTS, RANK_P)), axis=2)
    local = tl.arange(0, 16) - c0 // RANK_P
    inside = (local >= 0) & (local < EXPERTS)
    index = tl.zeros((BLOCK_M, 16), dtype=tl.int32) + tl.where(inside, local, 0)[None, :]
    return tl.where(inside[None, :], tl.gather(sums, index, 1), 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

# The shrink kernels walk the modality's rank columns in chunks of CHUNK = min(BLOCK_R, 64), one
# pass over u each, so registers stay bounded at any rank and expert count. The first chunk also
# computes the router logits; MoDE's layout (4 experts x r 8) is a single chunk.

@triton.jit
def _shrink_kernel(u_ptr, stride_ut, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak,
                   router_ptr, stride_re, stride_rk, hg_ptr, order_ptr, tiles_ptr, expert_offsets_ptr,
                   K, scaling, DOT_FP32: tl.constexpr, HAS_ROUTER: tl.constexpr, RANK: tl.constexpr,
                   RANK_P: tl.constexpr, BLOCK_E: tl.constexpr, SUB_TILES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """h' = scaling * g_e * (u A_e^T) for the tile's modality, stored in plan order."""
    BLOCK_R: tl.constexpr = BLOCK_E * RANK_P
    CHUNK: tl.constexpr = 64 if BLOCK_R > 64 else BLOCK_R
    modality, pos, tokens, rows, empty = _tile_rows(tiles_ptr, order_ptr, tl.program_id(0), SUB_TILES, BLOCK_M)
    if empty:
        return
    first_expert = tl.load(expert_offsets_ptr + modality)
    num_experts = tl.load(expert_offsets_ptr + modality + 1) - first_expert
    u_rows = u_ptr + tokens[:, None] * stride_ut  # rows past the tile's end read token 0, never stored
    out_rows = hg_ptr + pos[:, None] * BLOCK_R + tl.arange(0, CHUNK)[None, :]
    h, logits = _shrink_chunk(u_rows, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re,
                              stride_rk, first_expert, num_experts, 0, K, DOT_FP32, HAS_ROUTER, RANK, RANK_P,
                              CHUNK, BLOCK_M, BLOCK_K)
    gates = _gates(logits, num_experts) * scaling
    tl.store(out_rows, h * _spread(gates, 0, CHUNK, RANK_P), mask=rows[:, None])
    for c0 in range(CHUNK, num_experts * RANK_P, CHUNK):
        h, _ = _shrink_chunk(u_rows, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re,
                             stride_rk, first_expert, num_experts, c0, K, DOT_FP32, False, RANK, RANK_P,
                             CHUNK, BLOCK_M, BLOCK_K)
        tl.store(out_rows + c0, h * _spread(gates, c0, CHUNK, RANK_P), mask=rows[:, None])


@triton.jit
def _shrink_backward_chunk(h, c0, dy_rows, stride_dyn, b_ptr, stride_be, stride_bn, stride_br, hg_out, dh_out, rows,
                           first_expert, num_experts, gates, N, scaling, DOT_FP32: tl.constexpr, RANK: tl.constexpr,
                           RANK_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rank columns [c0, c0 + CHUNK) given h there: store h' and dh = scaling g_e (dy B_e); return
    this chunk's share of dgates_e = scaling h_e . (dy B_e), [BLOCK_M, 16]."""
    j = c0 + tl.arange(0, CHUNK)
    z = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_rows + n[None, :] * stride_dyn, mask=n[None, :] < N, other=0.0)
        b = _load_expert_cols(b_ptr, first_expert, num_experts, j[None, :], n[:, None], N, stride_be, stride_br,
                              stride_bn, RANK, RANK_P)
        z = _mma(z, dy, b, DOT_FP32, dy_rows.dtype.element_ty)
    column_gates = _spread(gates * scaling, c0, CHUNK, RANK_P)
    tl.store(hg_out + c0, h * column_gates, mask=rows[:, None])
    tl.store(dh_out + c0, z * column_gates, mask=rows[:, None])
    return scaling * _collect(h * z, c0, CHUNK, RANK_P, BLOCK_M)


@triton.jit
def _shrink_backward_kernel(u_ptr, stride_ut, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak,
                            router_ptr, stride_re, stride_rk, dy_ptr, stride_dyt, stride_dyn,
                            b_ptr, stride_be, stride_bn, stride_br, hg_ptr, dh_ptr, dlogit_ptr,
                            order_ptr, tiles_ptr, expert_offsets_ptr, K, N, scaling,
                            DOT_FP32: tl.constexpr, HAS_ROUTER: tl.constexpr, RANK: tl.constexpr,
                            RANK_P: tl.constexpr, BLOCK_E: tl.constexpr, SUB_TILES: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per tile: h' (for dB), dh = scaling g_e (dy B_e) (for dA, du) and dlogit (for dR, du).

    dlogit = g * (dg - sum_e g_e dg_e), the softmax backward, once every chunk has added to dg.
    """
    BLOCK_R: tl.constexpr = BLOCK_E * RANK_P
    CHUNK: tl.constexpr = 64 if BLOCK_R > 64 else BLOCK_R
    modality, pos, tokens, rows, empty = _tile_rows(tiles_ptr, order_ptr, tl.program_id(0), SUB_TILES, BLOCK_M)
    if empty:
        return
    first_expert = tl.load(expert_offsets_ptr + modality)
    num_experts = tl.load(expert_offsets_ptr + modality + 1) - first_expert
    u_rows = u_ptr + tokens[:, None] * stride_ut  # rows past the tile's end read token 0, never stored
    dy_rows = dy_ptr + tokens[:, None] * stride_dyt
    out = pos[:, None] * BLOCK_R + tl.arange(0, CHUNK)[None, :]
    h, logits = _shrink_chunk(u_rows, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re,
                              stride_rk, first_expert, num_experts, 0, K, DOT_FP32, HAS_ROUTER, RANK, RANK_P,
                              CHUNK, BLOCK_M, BLOCK_K)
    gates = _gates(logits, num_experts)
    dgates = _shrink_backward_chunk(h, 0, dy_rows, stride_dyn, b_ptr, stride_be, stride_bn, stride_br, hg_ptr + out,
                                    dh_ptr + out, rows, first_expert, num_experts, gates, N, scaling, DOT_FP32, RANK,
                                    RANK_P, CHUNK, BLOCK_M, BLOCK_K)
    for c0 in range(CHUNK, num_experts * RANK_P, CHUNK):
        h, _ = _shrink_chunk(u_rows, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re,
                             stride_rk, first_expert, num_experts, c0, K, DOT_FP32, False, RANK, RANK_P,
                             CHUNK, BLOCK_M, BLOCK_K)
        dgates += _shrink_backward_chunk(h, c0, dy_rows, stride_dyn, b_ptr, stride_be, stride_bn, stride_br,
                                         hg_ptr + out, dh_ptr + out, rows, first_expert, num_experts, gates, N,
                                         scaling, DOT_FP32, RANK, RANK_P, CHUNK, BLOCK_M, BLOCK_K)
    if HAS_ROUTER:
        dlogit = gates * (dgates - tl.sum(gates * dgates, axis=1)[:, None])
        tl.store(dlogit_ptr + pos[:, None] * 16 + tl.arange(0, 16)[None, :], dlogit, mask=rows[:, None])


# Fused GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per GPU family, each free of
# register spills for every expert layout (python -m mode_kernels.tools.compile_check --arch 80 90).
_TILES = {
    90: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    80: [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
}
# Float32 inputs take exact products on CUDA cores (no tensor cores): small tiles.
_FP32_TILES = [(64, 64, 32, 4, 3)]
_INTERPRET_TILES = [(16, 32, 32, 4, 1)]  # the interpreter is slow: one small config, no autotuning


def _tile_config(bm, bn, bk, num_warps, num_stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=num_warps,
                         num_stages=num_stages)


_EXPAND_CONFIGS = {family: [_tile_config(*t) for t in tiles] for family, tiles in _TILES.items()}
_FP32_CONFIGS = [_tile_config(*t) for t in _FP32_TILES]
_INTERPRET_CONFIGS = [_tile_config(*t) for t in _INTERPRET_TILES]


def _family(arch: int) -> int:
    return 90 if arch >= 90 else 80


def _expand_configs(arch: int, plan_block_m: int, dot_fp32: bool = False):
    """The configs the autotuner tries: the GPU family's (or float32's), BLOCK_M dividing the plan's tiles."""
    if INTERPRET:
        return _INTERPRET_CONFIGS
    configs = _FP32_CONFIGS if dot_fp32 else _EXPAND_CONFIGS[_family(arch)]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= plan_block_m]
    if fitting:
        return fitting
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"])
    return [triton.Config({**smallest.kwargs, "BLOCK_M": plan_block_m}, num_warps=smallest.num_warps,
                          num_stages=smallest.num_stages)]


def _prune_expand_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    args = {**named_args, **kwargs}
    major, minor = torch.cuda.get_device_capability()
    return _expand_configs(10 * major + minor, args["PLAN_BLOCK_M"], args["DOT_FP32"])


@triton.autotune(configs=_INTERPRET_CONFIGS if INTERPRET else _EXPAND_CONFIGS[90] + _EXPAND_CONFIGS[80] + _FP32_CONFIGS,
                 key=["IN", "OUT", "RANK", "BLOCK_E", "PLAN_BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune_expand_configs})
@triton.jit
def _expand_kernel(a_ptr, stride_at, stride_ai, w_ptr, stride_wi, stride_wo, bias_ptr,
                   lora_ptr, lw_ptr, stride_lwe, stride_lwi, stride_lwo, dlogit_ptr, router_ptr, stride_re, stride_ro,
                   out_ptr, stride_ot, stride_oo, order_ptr, tiles_ptr, expert_offsets_ptr, num_tiles, IN, OUT,
                   HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROUTER: tl.constexpr, DOT_FP32: tl.constexpr,
                   RANK: tl.constexpr, RANK_P: tl.constexpr, BLOCK_E: tl.constexpr, PLAN_BLOCK_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[t] = a[t] Wt + bias + lora[p] L_m (+ dlogit[p] R_m) for the rows of one tile, one output block.

    Wt is [IN, OUT] by strides (W^T in the forward, W in the backward); L_m [experts * RANK_P, OUT] is
    the modality's stacked B_e^T (forward) or A_e (backward), again by strides.
    """
    BLOCK_R: tl.constexpr = BLOCK_E * RANK_P
    # The LoRA K loop walks rank columns in chunks of at most 32 (few registers beside the accumulator).
    BLOCK_J: tl.constexpr = 32 if BLOCK_R > 32 else BLOCK_R
    SUB_TILES: tl.constexpr = PLAN_BLOCK_M // BLOCK_M
    dtype = out_ptr.dtype.element_ty

    # Grouped ordering: GROUP_M row blocks share each weight column block while it is in L2.
    pid = tl.program_id(0)
    num_row_blocks = num_tiles * SUB_TILES
    num_col_blocks = tl.cdiv(OUT, BLOCK_N)
    group = GROUP_M * num_col_blocks
    first_row_block = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % group) % group_rows
    col_block = (pid % group) // group_rows

    modality, pos, tokens, rows, empty = _tile_rows(tiles_ptr, order_ptr, row_block, SUB_TILES, BLOCK_M)
    if empty:
        return
    first_expert = tl.load(expert_offsets_ptr + modality)
    num_experts = tl.load(expert_offsets_ptr + modality + 1) - first_expert
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads need no row or column masks: rows past the tile's end read token 0 and columns past
    # OUT wrap around; neither is stored. Fewer predicates, fewer registers.
    safe_cols = cols % OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # LoRA expand first (LoRAFusion's order): a short K loop over the modality's rank columns.
    for j0 in range(0, num_experts * RANK_P, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        lora = tl.load(lora_ptr + pos[:, None] * BLOCK_R + j[None, :], mask=rows[:, None], other=0.0)
        lw = _load_expert_cols(lw_ptr, first_expert, num_experts, j[:, None], safe_cols[None, :], OUT, stride_lwe,
                               stride_lwi, stride_lwo, RANK, RANK_P)
        acc = _mma(acc, lora, lw, DOT_FP32, dtype)
    if HAS_ROUTER:
        # Single-expert modalities have no router term.
        e = tl.arange(0, 16)
        routed = tl.where(num_experts > 1, num_experts, 0)
        dlogit = tl.load(dlogit_ptr + pos[:, None] * 16 + e[None, :], mask=rows[:, None] & (e[None, :] < routed),
                         other=0.0)
        router = tl.load(router_ptr + (first_expert + e[:, None]) * stride_re + safe_cols[None, :] * stride_ro,
                         mask=e[:, None] < routed, other=0.0)
        acc = _mma(acc, dlogit, router, DOT_FP32, dtype)
    if HAS_BASE:
        a_rows = a_ptr + tokens[:, None] * stride_at
        w_cols = w_ptr + safe_cols[None, :] * stride_wo
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + k[None, :] * stride_ai, mask=k[None, :] < IN, other=0.0)
            w = tl.load(w_cols + k[:, None] * stride_wi, mask=k[:, None] < IN, other=0.0)
            acc = _mma(acc, a, w, DOT_FP32, dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_oo, acc.to(dtype),
             mask=rows[:, None] & (cols[None, :] < OUT))


@triton.jit
def _grouped_outer_kernel(left_ptr, dlogit_ptr, right_ptr, stride_rt, stride_rc, out_ptr, router_out_ptr,
                          order_ptr, offsets_ptr, expert_offsets_ptr, C, num_splits, num_col_blocks, num_experts_total,
                          HAS_ROUTER: tl.constexpr, DOT_FP32: tl.constexpr, RANK_P: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums over one token split of one modality: out[s, e*RANK_P + i, c] = sum_t left[t, j] right[t, c].

    left is a plan-ordered rank intermediate (h' or dh), right a token-indexed activation (dy or u).
    With HAS_ROUTER also router_out[s, e, c] = sum_t dlogit[t, e] right[t, c]. Every expert row
    of every split is written (zeros for an empty split), so the partials need no initialisation.
    """
    BLOCK_R: tl.constexpr = BLOCK_E * RANK_P
    pid = tl.program_id(0)
    col_block = pid % num_col_blocks
    split = (pid // num_col_blocks) % num_splits
    modality = pid // (num_col_blocks * num_splits)
    first_expert = tl.load(expert_offsets_ptr + modality)
    num_experts = tl.load(expert_offsets_ptr + modality + 1) - first_expert
    begin = tl.load(offsets_ptr + modality)
    end = tl.load(offsets_ptr + modality + 1)
    chunk = tl.cdiv(tl.cdiv(end - begin, num_splits), BLOCK_M) * BLOCK_M
    lo = begin + split * chunk
    hi = tl.minimum(lo + chunk, end)
    dtype = right_ptr.dtype.element_ty

    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_R)
    e = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    router_acc = tl.zeros((16, BLOCK_C), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        rows = pos < hi
        tokens = tl.load(order_ptr + pos, mask=rows, other=0)
        right = tl.load(right_ptr + tokens[:, None] * stride_rt + cols[None, :] * stride_rc,
                        mask=rows[:, None] & (cols[None, :] < C), other=0.0)
        left = tl.load(left_ptr + pos[:, None] * BLOCK_R + j[None, :], mask=rows[:, None], other=0.0)
        acc = _mma(acc, tl.trans(left), right, DOT_FP32, dtype)
        if HAS_ROUTER:
            dlogit = tl.load(dlogit_ptr + pos[:, None] * 16 + e[None, :],
                             mask=rows[:, None] & (e[None, :] < num_experts), other=0.0)
            router_acc = _mma(router_acc, tl.trans(dlogit), right, DOT_FP32, dtype)

    # Partials: out [num_splits, E * RANK_P, C], router_out [num_splits, E, C], float32.
    out_rows = split.to(tl.int64) * num_experts_total * RANK_P + first_expert * RANK_P + j
    tl.store(out_ptr + out_rows[:, None] * C + cols[None, :], acc,
             mask=(j[:, None] < num_experts * RANK_P) & (cols[None, :] < C))
    if HAS_ROUTER:
        router_rows = split.to(tl.int64) * num_experts_total + first_expert + e
        tl.store(router_out_ptr + router_rows[:, None] * C + cols[None, :], router_acc,
                 mask=(e[:, None] < num_experts) & (cols[None, :] < C))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Layout:
    """Compile-time shape of the experts: rank, padded rank, experts per tile, router or not."""

    def __init__(self, experts_per_modality, rank: int, router_given: bool):
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"lora_a: rank must be in [1, {MAX_RANK}] for the Triton backend, got {rank}")
        self.rank = rank
        self.rank_p = _next_pow2(rank)
        most = max(experts_per_modality)
        if most > ROUTER_WIDTH:
            raise ValueError(f"experts_per_modality: at most {ROUTER_WIDTH} experts per modality, got {most}")
        if most > 1 and not router_given:
            raise ValueError("router_weight: required when a modality has more than one expert")
        # BLOCK_R = BLOCK_E * RANK_P >= 16, the narrowest tl.dot operand.
        self.block_e = max(_next_pow2(most), 16 // min(self.rank_p, 16))
        self.block_r = self.block_e * self.rank_p
        self.has_router = most > 1
        self.num_experts = sum(experts_per_modality)


@functools.lru_cache(maxsize=64)
def _expert_offsets(experts_per_modality: tuple, device: torch.device) -> torch.Tensor:
    """int32 [M + 1]: modality m owns experts [offsets[m], offsets[m + 1]). Cached: no copy per call."""
    offsets = [0]
    for n in experts_per_modality:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _check_dtypes(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype == torch.float64:
            raise ValueError(f"{name}: float64 is not supported by the Triton backend (use backend='torch')")


def _dot_fp32(x: torch.Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


def _shrink_config(plan_block_m: int, dot_fp32: bool) -> dict:
    """Launch meta of the shrink kernels: 64-row tiles, accumulators of at most [64, 64] over 8 warps."""
    return dict(BLOCK_M=min(plan_block_m, 64), BLOCK_K=32 if INTERPRET or dot_fp32 else 64, num_warps=8,
                num_stages=1 if INTERPRET else 3)


def _weights_args(lay, lora_a, router_weight):
    router = router_weight if lay.has_router else lora_a
    return (lora_a, *lora_a.stride(), router, router.stride(0), router.stride(-1))


def _launch_shrink(u, lora_a, router_weight, plan, lay, scaling, expert_offsets, grad_y=None, lora_b=None):
    """Forward: h' [T, BLOCK_R]. Backward (grad_y given): (h', dh [T, BLOCK_R], dlogit [T, 16])."""
    T, K = u.shape
    meta = _shrink_config(plan.block_m, _dot_fp32(u))
    sub_tiles = plan.block_m // meta["BLOCK_M"]
    grid = (plan.tiles.shape[0] * sub_tiles,)
    common = dict(DOT_FP32=_dot_fp32(u), HAS_ROUTER=lay.has_router, RANK=lay.rank, RANK_P=lay.rank_p,
                  BLOCK_E=lay.block_e, SUB_TILES=sub_tiles, **meta)
    # With several column chunks, a modality with fewer experts leaves columns unwritten: zero them
    # (the reduction kernel reads whole rows). One chunk writes every column.
    alloc = torch.zeros if lay.block_r > SHRINK_CHUNK else torch.empty
    hg = alloc(T, lay.block_r, device=u.device, dtype=torch.float32)
    weights = _weights_args(lay, lora_a, router_weight)
    if grad_y is None:
        _shrink_kernel[grid](u, *u.stride(), *weights, hg, plan.order, plan.tiles, expert_offsets, K,
                             float(scaling), **common)
        return hg
    dh = alloc(T, lay.block_r, device=u.device, dtype=torch.float32)
    dlogit = torch.empty(T, ROUTER_WIDTH, device=u.device, dtype=torch.float32) if lay.has_router else hg
    N = grad_y.shape[1]
    _shrink_backward_kernel[grid](u, *u.stride(), *weights, grad_y, *grad_y.stride(), lora_b, *lora_b.stride(),
                                  hg, dh, dlogit, plan.order, plan.tiles, expert_offsets, K, N, float(scaling),
                                  **common)
    return hg, dh, (dlogit if lay.has_router else None)


def _launch_expand(out, a, w_in_out, bias, lora, lora_weight_ero, dlogit, router_weight, plan, lay,
                   expert_offsets):
    """out = a Wt + bias + lora L + dlogit R (terms that are None are skipped).

    w_in_out: (tensor, stride along IN, stride along OUT); lora_weight_ero: (tensor, stride per
    expert, per rank index, along OUT).
    """
    T, OUT = out.shape
    w, stride_wi, stride_wo = w_in_out
    lw, stride_lwe, stride_lwi, stride_lwo = lora_weight_ero
    IN = a.shape[1] if a is not None else 0
    has_router = dlogit is not None
    router = router_weight if has_router else lw
    num_tiles = plan.tiles.shape[0]

    def grid(meta):
        return (num_tiles * (plan.block_m // meta["BLOCK_M"]) * triton.cdiv(OUT, meta["BLOCK_N"]),)

    a_arg = a if a is not None else out
    _expand_kernel[grid](a_arg, *a_arg.stride(), w, stride_wi, stride_wo, bias if bias is not None else out,
                         lora, lw, stride_lwe, stride_lwi, stride_lwo, dlogit if has_router else lora,
                         router, router.stride(0), router.stride(-1), out, *out.stride(),
                         plan.order, plan.tiles, expert_offsets, num_tiles, IN, OUT,
                         HAS_BASE=a is not None, HAS_BIAS=bias is not None, HAS_ROUTER=has_router,
                         DOT_FP32=_dot_fp32(out), RANK=lay.rank, RANK_P=lay.rank_p, BLOCK_E=lay.block_e,
                         PLAN_BLOCK_M=plan.block_m)
    return out


def _num_splits(num_tokens: int) -> int:
    return max(1, min(MAX_SPLITS, num_tokens // TOKENS_PER_SPLIT))


def _grouped_outer_config(lay: _Layout, dot_fp32: bool) -> dict:
    """Launch meta of the reduction kernel: a [BLOCK_R, BLOCK_C] accumulator of <= 4096 floats per 128
    threads; float32 inputs (exact products on CUDA cores) take small tiles."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)
    if dot_fp32:
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=2)
    block_c = max(16, min(128, 4096 // lay.block_r))
    return dict(BLOCK_M=64, BLOCK_C=block_c, num_warps=4 if lay.block_r * block_c <= 4096 else 8, num_stages=3)


def _launch_grouped_outer(left, dlogit, right, plan, lay, expert_offsets):
    """Per expert: sum over its modality's tokens of left[t, rank cols]^T right[t] -> float32
    [E, RANK_P, C]; with dlogit also [E, C] for the router. Split over tokens, then summed."""
    T, C = right.shape
    splits = _num_splits(T)
    meta = _grouped_outer_config(lay, _dot_fp32(right))
    col_blocks = triton.cdiv(C, meta["BLOCK_C"])
    partial = torch.empty(splits, lay.num_experts * lay.rank_p, C, device=right.device, dtype=torch.float32)
    router_partial = None
    if dlogit is not None:
        router_partial = torch.empty(splits, lay.num_experts, C, device=right.device, dtype=torch.float32)
    grid = (plan.num_modalities * splits * col_blocks,)
    _grouped_outer_kernel[grid](left, dlogit if dlogit is not None else left, right, *right.stride(), partial,
                                router_partial if router_partial is not None else partial, plan.order,
                                plan.offsets, expert_offsets, C, splits, col_blocks, lay.num_experts,
                                HAS_ROUTER=dlogit is not None, DOT_FP32=_dot_fp32(right), RANK_P=lay.rank_p,
                                BLOCK_E=lay.block_e, **meta)
    total = partial.sum(0).view(lay.num_experts, lay.rank_p, C)[:, :lay.rank]
    return total, (router_partial.sum(0) if router_partial is not None else None)


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        experts_per_modality, scaling):
    """Same contract as ``mode_kernels.reference.routed_lora.routed_lora_forward``."""
    _check_dtypes(x=x, weight=weight, bias=bias, lora_input=lora_input, lora_a=lora_a, lora_b=lora_b,
                  router_weight=router_weight)
    lay = _Layout(experts_per_modality, lora_a.shape[1], router_weight is not None)
    T = x.shape[0]
    y = x.new_empty(T, weight.shape[0])
    if T == 0:
        return y
    offsets = _expert_offsets(tuple(experts_per_modality), x.device)
    u = x if lora_input is None else lora_input
    hg = _launch_shrink(u, lora_a, router_weight, plan, lay, scaling, offsets)
    # W^T as [K, N]: stride along K is W's column stride. B_e^T as [r, N] per expert.
    return _launch_expand(y, x, (weight, weight.stride(1), weight.stride(0)), bias, hg,
                          (lora_b, lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), None, None,
                          plan, lay, offsets)


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight,
                         experts_per_modality, scaling, needs):
    """Same contract as ``mode_kernels.reference.routed_lora.routed_lora_backward``."""
    _check_dtypes(grad_y=grad_y, x=x, weight=weight, bias=bias, lora_input=lora_input, lora_a=lora_a,
                  lora_b=lora_b, router_weight=router_weight)
    lay = _Layout(experts_per_modality, lora_a.shape[1], router_weight is not None)
    need_dx, need_du, need_w, need_b, need_a, need_lb, need_r = (bool(n) for n in needs)
    need_du = need_du and lora_input is not None
    need_r = need_r and router_weight is not None
    grads = [None] * 7
    if need_w:
        grads[2] = (grad_y.t() @ x.to(grad_y.dtype)).to(weight.dtype)
    if need_b and bias is not None:
        grads[3] = grad_y.sum(0, dtype=torch.float32).to(bias.dtype)
    if x.shape[0] == 0:
        for i, (need, t) in enumerate(zip((need_dx, need_du, False, False, need_a, need_lb, need_r),
                                          (x, lora_input, weight, bias, lora_a, lora_b, router_weight))):
            if need:
                grads[i] = torch.zeros_like(t)
        return tuple(grads)

    separate = lora_input is not None
    u = lora_input if separate else x
    offsets = _expert_offsets(tuple(experts_per_modality), x.device)
    needs_lora_grad = need_a or need_lb or need_r or need_du or (need_dx and not separate)
    if needs_lora_grad:
        hg, dh, dlogit = _launch_shrink(u, lora_a, router_weight, plan, lay, scaling, offsets, grad_y, lora_b)
    # dx = dy W (+ dh A + dlogit R when the adapters see x); d lora_input = dh A + dlogit R.
    a_by_rank = (lora_a, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    if need_dx and separate:
        grads[0] = (grad_y @ weight.to(grad_y.dtype)).to(x.dtype)
    elif need_dx:
        grads[0] = _launch_expand(torch.empty_like(x, memory_format=torch.contiguous_format), grad_y,
                                  (weight, weight.stride(0), weight.stride(1)), None, dh, a_by_rank, dlogit,
                                  router_weight, plan, lay, offsets)
    if need_du:
        grads[1] = _launch_expand(torch.empty_like(u, memory_format=torch.contiguous_format), None,
                                  (weight, 0, 0), None, dh, a_by_rank, dlogit, router_weight, plan, lay, offsets)
    if need_a or need_r:
        d_a, d_router = _launch_grouped_outer(dh, dlogit if need_r else None, u, plan, lay, offsets)
        if need_a:
            grads[4] = d_a.to(lora_a.dtype).contiguous()
        if need_r:
            # Without a multi-expert modality the router is unused: its gradient is zero.
            grads[6] = torch.zeros_like(router_weight) if d_router is None else d_router.to(router_weight.dtype)
    if need_lb:
        d_b, _ = _launch_grouped_outer(hg, None, grad_y, plan, lay, offsets)
        grads[5] = d_b.transpose(1, 2).to(lora_b.dtype).contiguous()
    return tuple(grads)
