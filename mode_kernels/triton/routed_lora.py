"""Triton modality-routed LoRA: y = x W^T + b + scaling * sum_e g_e (u A_e^T) B_e^T, per token's modality.

Same contract as ``mode_kernels.reference.routed_lora``. Tokens stay in their own order and the
adapters are dense and masked: every token computes all E experts' rank columns, and the columns
of experts its modality does not own are zero. Column j of a rank intermediate is expert
j // RANK_P, rank index j % RANK_P (RANK_P = next power of two of r), C = E * RANK_P columns.

Forward (2 launches):

* ``_shrink_kernel``: H = scaling * g_e * (u A_e^T), [T, C], gates and scaling folded in, and the
  float32 gates [T, E] (kept for the backward), in one pass over u.
* ``_gemm_kernel``: y = [x | H] . [W | B_cat]^T + b, one GEMM whose K loop has the adapters as
  one extra tile; rows and columns in token order, no gathers, no padded tiles.
  On sm_90+ with half-precision tensors TMA can copy (inner stride 1, 16-byte aligned rows), x,
  W and y move by TMA block copies (host tensor descriptors); elsewhere by pointer loads.

Backward (3 launches):

* ``_grad_rows_kernel``: one pass over dy gives Z = dy B_cat, then per token in registers
  the gate and softmax backward: G = [dh | dlogit], dh = scaling g_e Z (the gradient of u A^T),
  dlogit the router logits' gradient.
* ``_gemm_kernel`` again: dx = [dy | G] . [W ; A_cat ; R], the adapters one extra K tile. When
  ``plan_weight_grads`` finds it pays (half precision, many tokens; u = x), the same GEMM also sums
  dA, dR = G^T u and dB = H^T dy: a persistent grid of (token segment, column block) programs, each
  adding its row blocks' products into its segment's float32 partials (dy's tiles are the ones its
  K loop streams, u's tile has dx's tile shape), so neither x nor dy is read again.
* ``_weight_grads_kernel``: dA, dR and dB in their own dtype and layout, each program one block of
  output columns: the sum of the segments' partials in segment order, or, when the GEMM did not
  make them, G^T u and H^T dy reduced over every token. Deterministic either way (no atomics).

The expert layout (which modality owns which experts) is a compile-time constant packed in one
integer, so nothing is copied to the device at first use and nothing waits on the host.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..contract import RoutedLoraGrads, RoutedLoraNeeds, RoutedLoraOptions, RoutedLoraSaved
from ..routing import RoutingPlan
from ._common import INTERPRET, sm_count

# At most 16 experts per modality and rank 64 (registers of the rank chunks below).
MAX_EXPERTS_PER_MODALITY = 16
MAX_RANK = 64
# The expert layout travels as one constexpr: modality m owns experts [bound(m), bound(m + 1)),
# each bound in BOUND_BITS bits of a 63-bit integer.
BOUND_BITS = 7
MAX_MODALITIES = 63 // BOUND_BITS - 1
MAX_EXPERTS = (1 << BOUND_BITS) - 1
# Rank columns are walked in chunks of at most this many (registers).
MAX_CHUNK = 64
# Hopper and later copy the GEMM's tiles by TMA (tensor descriptors); MODE_KERNELS_TMA=0 keeps
# pointer loads everywhere (a switch for a first GPU run: the TMA path has run only in the interpreter).
TMA_MIN_ARCH = 90
TMA_ENABLED = os.environ.get("MODE_KERNELS_TMA", "1") != "0"


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
def _columns(j, NUM_EXPERTS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr):
    """Rank column j -> (expert, rank index, whether the column exists); expert and rank in int64, as
    every index that multiplies a stride (weights may span more than 2^31 elements)."""
    expert = (j // RANK_P).to(tl.int64)
    rank = (j % RANK_P).to(tl.int64)
    return expert, rank, (expert < NUM_EXPERTS) & (rank < RANK)


@triton.jit
def _own_experts(ids_ptr, rows, row_mask, BOUNDS: tl.constexpr, NUM_MODALITIES: tl.constexpr,
                 E_W: tl.constexpr, BITS: tl.constexpr):
    """[BLOCK_M, E_W]: expert e belongs to the token's modality; [BLOCK_M]: that modality has several.

    Ids outside [0, M) own no expert (the adapters add nothing), so bad ids never address memory.
    """
    m = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    known = (m >= 0) & (m < NUM_MODALITIES)
    m = tl.where(known, m, 0)
    field: tl.constexpr = (1 << BITS) - 1
    bounds = tl.full(m.shape, BOUNDS, tl.int64)
    first = (bounds >> (BITS * m)) & field
    last = tl.where(known, (bounds >> (BITS * (m + 1))) & field, first)
    e = tl.arange(0, E_W)[None, :]
    return (e >= first[:, None]) & (e < last[:, None]), last - first > 1


@triton.jit
def _gates(logits, own, several):
    """Float32 softmax over each token's own experts (1 for a single expert, whose logit is unused)."""
    z = tl.where(own, tl.where(several[:, None], logits, 0.0), float("-inf"))
    top = tl.max(z, axis=1)
    p = tl.where(own, tl.exp(z - tl.where(top == float("-inf"), 0.0, top)[:, None]), 0.0)
    total = tl.sum(p, axis=1)
    return p / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _expert_onehot(expert, exists, E_W: tl.constexpr):
    """[E_W, CHUNK] float32: 1 where rank column j belongs to expert e. Per-expert values reach their
    columns (and column sums their experts) by an exact dot with it: no register gathers."""
    return ((tl.arange(0, E_W)[:, None] == expert[None, :]) & exists[None, :]).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _shrink_kernel(u_ptr, stride_ut, stride_uk, a_ptr, stride_ae, stride_ar, stride_ak, router_ptr, stride_re,
                   stride_rk, ids_ptr, h_ptr, gates_ptr, T, K, scaling,
                   BOUNDS: tl.constexpr, BOUND_BITS: tl.constexpr, NUM_MODALITIES: tl.constexpr,
                   NUM_EXPERTS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr, HAS_ROUTER: tl.constexpr,
                   DOT_FP32: tl.constexpr, E_W: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """H[:, chunk] = scaling * g_e * (u A_e^T) for one block of tokens; the first chunk also stores the gates."""
    C: tl.constexpr = NUM_EXPERTS * RANK_P
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    j = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    expert, rank, exists = _columns(j, NUM_EXPERTS, RANK, RANK_P)
    e = tl.arange(0, E_W)
    dtype = u_ptr.dtype.element_ty
    # Rows past T read row T - 1 (never stored): no row predicate in the K loop.
    # 64-bit pointers advanced by a 64-bit step per K tile (no per-tile 64-bit offset products).
    k_first = tl.arange(0, BLOCK_K).to(tl.int64)
    u_ptrs = u_ptr + tl.minimum(rows, T - 1).to(tl.int64)[:, None] * stride_ut + k_first[None, :] * stride_uk
    a_ptrs = a_ptr + (expert * stride_ae + rank * stride_ar)[None, :] + k_first[:, None] * stride_ak
    r_ptrs = router_ptr + e.to(tl.int64)[None, :] * stride_re + k_first[:, None] * stride_rk
    step = tl.full([], BLOCK_K, tl.int64)
    h = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    logits = tl.zeros((BLOCK_M, E_W), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_ptrs, mask=k[None, :] < K, other=0.0)
        a = tl.load(a_ptrs, mask=exists[None, :] & (k[:, None] < K), other=0.0)
        h = _mma(h, u, a, DOT_FP32, dtype)
        if HAS_ROUTER:
            r = tl.load(r_ptrs, mask=(e[None, :] < NUM_EXPERTS) & (k[:, None] < K), other=0.0)
            logits = _mma(logits, u, r, DOT_FP32, dtype)
            r_ptrs += step * stride_rk
        u_ptrs += step * stride_uk
        a_ptrs += step * stride_ak
    own, several = _own_experts(ids_ptr, rows, row_mask, BOUNDS, NUM_MODALITIES, E_W, BOUND_BITS)
    gates = _gates(logits, own, several)
    column_gates = tl.dot(gates * scaling, _expert_onehot(expert, exists, E_W), input_precision="ieee")
    out_rows = rows.to(tl.int64)[:, None] * C
    tl.store(h_ptr + out_rows + j[None, :], (h * column_gates).to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (j[None, :] < C))
    if HAS_ROUTER:
        if tl.program_id(1) == 0:
            tl.store(gates_ptr + rows.to(tl.int64)[:, None] * NUM_EXPERTS + e[None, :], gates,
                     mask=row_mask[:, None] & (e[None, :] < NUM_EXPERTS))


@triton.jit
def _grad_rows_kernel(dy_ptr, stride_dt, stride_dn, b_ptr, stride_be, stride_bn, stride_br, h_ptr, gates_ptr,
                      ids_ptr, g_ptr, T, N, scaling,
                      BOUNDS: tl.constexpr, BOUND_BITS: tl.constexpr, NUM_MODALITIES: tl.constexpr,
                      NUM_EXPERTS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr, HAS_ROUTER: tl.constexpr,
                      DOT_FP32: tl.constexpr, E_W: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """G = [dh | dlogit] for one block of tokens, from Z = dy B_cat (one pass over dy per rank chunk).

    With q_e = sum_i H_ei Z_ei (= g_e dL/dg_e, H holding scaling g_e h): dh = scaling g_e Z and
    dlogit_e = q_e - g_e sum_f q_f, the softmax backward with no division by a gate.
    """
    C: tl.constexpr = NUM_EXPERTS * RANK_P
    CG: tl.constexpr = C + NUM_EXPERTS if HAS_ROUTER else C
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    e = tl.arange(0, E_W)
    dtype = dy_ptr.dtype.element_ty
    own, several = _own_experts(ids_ptr, rows, row_mask, BOUNDS, NUM_MODALITIES, E_W, BOUND_BITS)
    if HAS_ROUTER:
        gates = tl.load(gates_ptr + rows.to(tl.int64)[:, None] * NUM_EXPERTS + e[None, :],
                        mask=row_mask[:, None] & own, other=0.0)
    else:
        gates = own.to(tl.float32)
    dy_rows = dy_ptr + tl.minimum(rows, T - 1).to(tl.int64)[:, None] * stride_dt
    q = tl.zeros((BLOCK_M, E_W), dtype=tl.float32)
    for c0 in range(0, C, CHUNK):
        j = c0 + tl.arange(0, CHUNK)
        expert, rank, exists = _columns(j, NUM_EXPERTS, RANK, RANK_P)
        b_cols = b_ptr + (expert * stride_be + rank * stride_br)[None, :]
        z = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            dy = tl.load(dy_rows + n[None, :] * stride_dn, mask=n[None, :] < N, other=0.0)
            b = tl.load(b_cols + n[:, None] * stride_bn, mask=exists[None, :] & (n[:, None] < N), other=0.0)
            z = _mma(z, dy, b, DOT_FP32, dtype)
        onehot = _expert_onehot(expert, exists, E_W)
        in_rows = rows.to(tl.int64)[:, None]
        h = tl.load(h_ptr + in_rows * C + j[None, :], mask=row_mask[:, None] & (j[None, :] < C), other=0.0)
        q += tl.dot(h.to(tl.float32) * z, tl.trans(onehot), input_precision="ieee")
        column_gates = tl.dot(gates * scaling, onehot, input_precision="ieee")
        tl.store(g_ptr + in_rows * CG + j[None, :], (z * column_gates).to(g_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (j[None, :] < C))
    if HAS_ROUTER:
        dlogit = tl.where(several[:, None], q - gates * tl.sum(q, axis=1)[:, None], 0.0)
        tl.store(g_ptr + rows.to(tl.int64)[:, None] * CG + C + e[None, :], dlogit.to(g_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (e[None, :] < NUM_EXPERTS))


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per GPU family, each free of register
# spills (python -m mode_kernels.tools.compile_check --arch 80 90). Decode tiles (up to 64 tokens):
# one 64-row block covers every token, so each weight tile is read once; 64 rows is the smallest
# wgmma tile (the padding rows cost tensor-core time a memory-bound GEMM has to spare).
_TILES = {
    90: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
    80: [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
}
_DECODE_TILES = [(64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 8, 3)]
# float32: exact products on CUDA cores, small tiles, per GPU family: each spill-free under Triton 3.6
# and 3.9 for every layout (on sm_80, BLOCK_K 32 spilled 8-24 bytes with 3 stages under 3.9 or 2
# stages under 3.6; on sm_90, BLOCK_K 16 spilled 8 bytes under both).
_FP32_TILES = {90: [(32, 64, 32, 4, 3)], 80: [(32, 64, 16, 4, 3)]}
# The dx GEMM that also sums the weight gradients (WEIGHT_GRADS), for half precision at large T only
# (see plan_weight_grads): tiles spill-free with the extra work, whose row-block loop holds shared
# memory and registers across tiles (128 x 256 ran out of both on sm_90, 4 warps spilled, and so did
# every float32 tile tried, 8-24 bytes), at least MIN_SEGMENTS token segments (weight_grad_segments),
# and the partials' tiles PARTIAL_ROWS rank columns at a time (64 spilled).
_WEIGHT_GRADS_TILES = {90: [(128, 128, 64, 8, 3)], 80: [(128, 128, 32, 8, 3)]}
MIN_SEGMENTS = 8
PARTIAL_ROWS = tl.constexpr(32)
DECODE_TOKENS = 64
T_BUCKETS = (16, 32, 64, 128)  # tokens above the last share one bucket


def _set_tma_blocks(nargs):
    """Config pre-hook: the TMA descriptors' block shapes are the config's tiles (part of the kernel's
    signature, so each config compiles its own)."""
    if nargs["a_desc"] is None:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_ROWS_OUT"] else [bk, bn]
    nargs["out_desc"].block_shape = [bm, bn]


def _config(bm, bn, bk, num_warps, num_stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=num_warps,
                         num_stages=num_stages, pre_hook=_set_tma_blocks)


def t_bucket(num_tokens: int) -> int:
    """The autotune bucket of a token count: the smallest of T_BUCKETS holding it, else 2 * the last."""
    return next((b for b in T_BUCKETS if num_tokens <= b), 2 * T_BUCKETS[-1])


def gemm_configs(arch: int, bucket: int, dot_fp32: bool, weight_grads: bool = False) -> list:
    """The configs the GEMM autotuner tries for a GPU family, token bucket and precision, and for
    the dx GEMM that also sums the weight gradients."""
    if INTERPRET:  # the interpreter is slow: one config, no autotuning
        return [_config(min(bucket, 32), 32, 32, 4, 1)]
    family = 90 if arch >= 90 else 80
    if dot_fp32:
        return [_config(*t) for t in _FP32_TILES[family]]
    if weight_grads:
        return [_config(*t) for t in _WEIGHT_GRADS_TILES[family]]
    if bucket <= DECODE_TOKENS:
        return [_config(*t) for t in _DECODE_TILES]
    return [_config(*t) for t in _TILES[family]]


def _prune_gemm_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    args = {**named_args, **kwargs}
    major, minor = torch.cuda.get_device_capability()
    return gemm_configs(10 * major + minor, args["t_bucket"], args["DOT_FP32"], args["WEIGHT_GRADS"])


_ALL_GEMM_CONFIGS = gemm_configs(90, 16, False) if INTERPRET else [
    _config(*t) for t in [*_TILES[90], *_TILES[80], *_FP32_TILES[90], *_FP32_TILES[80], *_DECODE_TILES]]


@triton.autotune(configs=_ALL_GEMM_CONFIGS,
                 key=["t_bucket", "IN", "OUT", "EXT", "HAS_BIAS", "ROUTER_ROWS", "NUM_EXPERTS", "RANK", "RANK_P",
                      "DOT_FP32", "BLOCK_J", "USE_TMA", "W_ROWS_OUT", "WEIGHT_GRADS"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _gemm_kernel(a_ptr, stride_at, stride_ai, w_ptr, stride_wi, stride_wo, ext_ptr, lw_ptr, stride_le, stride_li,
                 stride_lo, router_ptr, stride_re, stride_ro, bias_ptr, out_ptr, stride_ot, stride_oo,
                 a_desc, w_desc, out_desc, u_ptr, stride_ut, stride_uk, h_ptr, partial_a_ptr, partial_b_ptr,
                 T, IN, OUT, t_bucket, segments,
                 EXT: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTER_ROWS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                 RANK: tl.constexpr, RANK_P: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_J: tl.constexpr,
                 USE_TMA: tl.constexpr, W_ROWS_OUT: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = [a | ext] . [Wt ; L] (+ bias): a [T, IN] by strides, Wt [IN, OUT] by strides, ext [T, EXT]
    row-major, L [EXT, OUT]: rank column j is expert j // RANK_P's row j % RANK_P of lw (a 3-D tensor
    by strides), and with ROUTER_ROWS the last NUM_EXPERTS columns are the router's rows.

    Forward: a = x, Wt = W^T, ext = H, L = B_cat^T. Input gradient: a = dy, Wt = W, ext = G,
    L = [A_cat ; R]. IN = 0 leaves only the adapters' term.

    USE_TMA (sm_90+): a, W and out move by TMA block copies through host descriptors (a [T, IN],
    W as stored: [OUT, IN] when W_ROWS_OUT, else [IN, OUT]; out [T, OUT]), out-of-bounds rows and
    columns zero-filled on load and dropped on store; the pointers and strides of a, W, out are
    then unused. The adapters' tile keeps pointer loads (narrow, and their rows need no alignment).

    WEIGHT_GRADS (the dx GEMM, u = x): a persistent grid of (token segment, column block) programs,
    each walking its segment's row blocks (the segments split the row blocks as evenly as they can,
    none empty). Per row block it also adds G^T u[rows, cols] (u's tile has the output tile's shape)
    to its segment's float32 partial of [dA ; dR] [EXT, OUT], and, for the columns of dy it owns
    (chunks of BLOCK_K, chunk c owned by column block c % column blocks), H^T dy to the segment's
    partial of dB [C, IN]: dy's tiles have just streamed through the K loops of the segment's
    programs, so they come from L2 if they are still there. Each partial has one writer, in row-block
    order: deterministic, no atomics.
    """
    C: tl.constexpr = NUM_EXPERTS * RANK_P
    # The adapter tile is no wider than the K tile; when the adapters take several tiles, their
    # [BJ, BLOCK_N] tile is at most 64 x 128 (registers: the dx GEMM at ranks 16-64 spilled with
    # 64 x 256 tiles on sm_90 under Triton 3.6; one 64 x 256 tile, as at rank 8, does not).
    BJ_K: tl.constexpr = BLOCK_K if BLOCK_K < BLOCK_J else BLOCK_J
    BJ: tl.constexpr = BJ_K if BJ_K * BLOCK_N <= 8192 or EXT <= BJ_K else 8192 // BLOCK_N
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(T, BLOCK_M)
    num_col_blocks = tl.cdiv(OUT, BLOCK_N)
    if WEIGHT_GRADS:
        # Segment fastest: the programs running together share column blocks of W (and row blocks of dy).
        segment = pid % segments
        col_block = pid // segments
        first_row_block = segment * num_row_blocks // segments
        for row_block in range(first_row_block, (segment + 1) * num_row_blocks // segments):
            _gemm_tile(a_ptr, stride_at, stride_ai, w_ptr, stride_wi, stride_wo, ext_ptr, lw_ptr, stride_le,
                       stride_li, stride_lo, router_ptr, stride_re, stride_ro, bias_ptr, out_ptr, stride_ot,
                       stride_oo, a_desc, w_desc, out_desc, T, IN, OUT, row_block, col_block, EXT, HAS_BIAS,
                       ROUTER_ROWS, NUM_EXPERTS, RANK, RANK_P, DOT_FP32, USE_TMA, W_ROWS_OUT, BLOCK_M, BLOCK_N,
                       BLOCK_K, BJ)
            # The weight gradients' partials, [PARTIAL_ROWS, BLOCK_K] at a time (registers).
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            safe_rows = tl.minimum(rows, T - 1).to(tl.int64)
            later = (row_block > first_row_block).to(tl.int32)
            for c0 in range(0, BLOCK_N, BLOCK_K):
                cols = col_block * BLOCK_N + c0 + tl.arange(0, BLOCK_K)
                _add_partials(partial_a_ptr, segment, EXT, OUT, ext_ptr, EXT, rows, T,
                              u_ptr + safe_rows[:, None] * stride_ut + (cols % OUT).to(tl.int64)[None, :] * stride_uk,
                              cols, later, DOT_FP32, PARTIAL_ROWS)
            for chunk in range(col_block, tl.cdiv(IN, BLOCK_K), num_col_blocks):
                n = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
                _add_partials(partial_b_ptr, segment, C, IN, h_ptr, C, rows, T,
                              a_ptr + safe_rows[:, None] * stride_at + (n % IN).to(tl.int64)[None, :] * stride_ai,
                              n, later, DOT_FP32, PARTIAL_ROWS)
    else:
        # Grouped ordering: GROUP_M row blocks share each weight column block while it is in L2.
        group = GROUP_M * num_col_blocks
        first_row_block = (pid // group) * GROUP_M
        group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
        row_block = first_row_block + (pid % group) % group_rows
        col_block = (pid % group) // group_rows
        _gemm_tile(a_ptr, stride_at, stride_ai, w_ptr, stride_wi, stride_wo, ext_ptr, lw_ptr, stride_le, stride_li,
                   stride_lo, router_ptr, stride_re, stride_ro, bias_ptr, out_ptr, stride_ot, stride_oo,
                   a_desc, w_desc, out_desc, T, IN, OUT, row_block, col_block, EXT, HAS_BIAS, ROUTER_ROWS,
                   NUM_EXPERTS, RANK, RANK_P, DOT_FP32, USE_TMA, W_ROWS_OUT, BLOCK_M, BLOCK_N, BLOCK_K, BJ)


@triton.jit
def _gemm_tile(a_ptr, stride_at, stride_ai, w_ptr, stride_wi, stride_wo, ext_ptr, lw_ptr, stride_le, stride_li,
               stride_lo, router_ptr, stride_re, stride_ro, bias_ptr, out_ptr, stride_ot, stride_oo,
               a_desc, w_desc, out_desc, T, IN, OUT, row_block, col_block,
               EXT: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTER_ROWS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
               RANK: tl.constexpr, RANK_P: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr,
               W_ROWS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BJ: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of ``_gemm_kernel``'s output (its arguments)."""
    C: tl.constexpr = NUM_EXPERTS * RANK_P
    dtype = out_ptr.dtype.element_ty
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads need no row or column predicates: rows past T read row T - 1, columns past OUT wrap
    # around; neither is stored.
    safe_rows = tl.minimum(rows, T - 1).to(tl.int64)
    safe_cols = (cols % OUT).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # The adapters first (LoRAFusion's order): EXT extra K columns.
    for j0 in range(0, EXT, BJ):
        j = j0 + tl.arange(0, BJ)
        ext = tl.load(ext_ptr + safe_rows[:, None] * EXT + j[None, :], mask=j[None, :] < EXT, other=0.0)
        expert, rank, exists = _columns(j, NUM_EXPERTS, RANK, RANK_P)
        lw = tl.load(lw_ptr + (expert * stride_le + rank * stride_li)[:, None] + safe_cols[None, :] * stride_lo,
                     mask=exists[:, None], other=0.0)
        if ROUTER_ROWS:
            is_router = (j >= C) & (j < C + NUM_EXPERTS)
            lw += tl.load(router_ptr + (tl.where(is_router, j - C, 0).to(tl.int64) * stride_re)[:, None]
                          + safe_cols[None, :] * stride_ro, mask=is_router[:, None], other=0.0)
        acc = _mma(acc, ext, lw, DOT_FP32, dtype)
    if USE_TMA:
        first_row = row_block * BLOCK_M
        first_col = col_block * BLOCK_N
        for k0 in range(0, IN, BLOCK_K):
            a = a_desc.load([first_row, k0])
            if W_ROWS_OUT:
                w = tl.trans(w_desc.load([first_col, k0]))
            else:
                w = w_desc.load([k0, first_col])
            acc = _mma(acc, a, w, DOT_FP32, dtype)
    else:
        a_rows = a_ptr + safe_rows[:, None] * stride_at
        w_cols = w_ptr + safe_cols[None, :] * stride_wo
        for k0 in range(0, IN, BLOCK_K):
            k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            a = tl.load(a_rows + k[None, :] * stride_ai, mask=k[None, :] < IN, other=0.0)
            w = tl.load(w_cols + k[:, None] * stride_wi, mask=k[:, None] < IN, other=0.0)
            acc = _mma(acc, a, w, DOT_FP32, dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < OUT, other=0.0).to(tl.float32)[None, :]
    if USE_TMA:
        out_desc.store([first_row, first_col], acc.to(dtype))
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ot + cols.to(tl.int64)[None, :] * stride_oo,
                 acc.to(dtype), mask=(rows[:, None] < T) & (cols[None, :] < OUT))


@triton.jit
def _add_partials(partial_ptr, segment, ROWS: tl.constexpr, COLS, left_ptr, LEFT_COLS: tl.constexpr, rows, T,
                  right_ptrs, cols, later, DOT_FP32: tl.constexpr, BJ: tl.constexpr):
    """partial[segment, :ROWS, cols] (+)= left[rows, :ROWS]^T right[rows, cols] (added only when later):
    one program's float32 partial sum over its segment's row blocks. left is row-major [T, LEFT_COLS];
    right_ptrs point at the [rows, cols] tile (rows past T count as zero)."""
    right = tl.load(right_ptrs)
    dtype = right_ptrs.dtype.element_ty
    in_rows = rows < T
    in_cols = cols < COLS
    for j0 in range(0, ROWS, BJ):
        j = j0 + tl.arange(0, BJ)
        left = tl.load(left_ptr + rows.to(tl.int64)[:, None] * LEFT_COLS + j[None, :],
                       mask=in_rows[:, None] & (j[None, :] < ROWS), other=0.0)
        part = _mma(tl.zeros((BJ, cols.shape[0]), dtype=tl.float32), tl.trans(left), right, DOT_FP32, dtype)
        ptrs = partial_ptr + ((segment * ROWS + j).to(tl.int64) * COLS)[:, None] + cols[None, :]
        mask = (j[:, None] < ROWS) & in_cols[None, :]
        # The earlier row blocks' sum (none before the first); a block mask: the interpreter takes no scalar one.
        earlier = (tl.zeros((BJ,), tl.int32) + later) > 0
        part += tl.load(ptrs, mask=mask & earlier[:, None], other=0.0)
        tl.store(ptrs, part, mask=mask)
        # The next row block's read-modify-write may run on other threads of this program.
        tl.debug_barrier()


@triton.jit
def _sum_over_tokens(left_ptr, LEFT_COLS: tl.constexpr, right_ptr, stride_rt, stride_rc, T, RIGHT_COLS, j, cols,
                     DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum_t left[t, j]^T right[t, cols] over every token: [len(j), len(cols)] float32."""
    dtype = right_ptr.dtype.element_ty
    acc = tl.zeros((j.shape[0], cols.shape[0]), dtype=tl.float32)
    right_cols = right_ptr + (cols % RIGHT_COLS).to(tl.int64)[None, :] * stride_rc
    for t0 in range(0, T, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        t64 = t.to(tl.int64)[:, None]
        left = tl.load(left_ptr + t64 * LEFT_COLS + j[None, :], mask=(t[:, None] < T) & (j[None, :] < LEFT_COLS),
                       other=0.0)
        right = tl.load(right_cols + t64 * stride_rt, mask=t[:, None] < T, other=0.0)
        acc = _mma(acc, tl.trans(left), right, DOT_FP32, dtype)
    return acc


@triton.jit
def _sum_segments(partial_ptr, ROWS: tl.constexpr, COLS, segments, j, cols):
    """sum_s partial[s, j, cols] over the segments in order: [len(j), len(cols)] float32."""
    acc = tl.zeros((j.shape[0], cols.shape[0]), dtype=tl.float32)
    mask = (j[:, None] < ROWS) & (cols[None, :] < COLS)
    for s in range(segments):
        acc += tl.load(partial_ptr + ((s * ROWS + j).to(tl.int64) * COLS)[:, None] + cols[None, :], mask=mask,
                       other=0.0)
    return acc


@triton.jit
def _weight_grads_kernel(g_ptr, h_ptr, u_ptr, stride_ut, stride_uk, dy_ptr, stride_dt, stride_dn,
                         partial_a_ptr, partial_b_ptr, segments,
                         da_ptr, stride_dae, stride_dar, stride_dak, dr_ptr, stride_dre, stride_drk,
                         db_ptr, stride_dbe, stride_dbn, stride_dbr, T, K, N, programs_a, programs_b,
                         NUM_EXPERTS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr,
                         HAS_ROUTER: tl.constexpr, WRITE_A: tl.constexpr, WRITE_R: tl.constexpr,
                         FROM_PARTIALS: tl.constexpr, DOT_FP32: tl.constexpr, CHUNK_A: tl.constexpr,
                         CHUNK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Programs [0, programs_a): [dA ; dR] = G^T u for one rank chunk and one block of K columns.
    Programs [programs_a, programs_a + programs_b): dB = H^T dy for one rank chunk and block of N columns.
    Each reduces over every token, then stores once. FROM_PARTIALS: each sums instead the dx GEMM's
    per-segment float32 partials ([segments, CG, K] and [segments, C, N]) in segment order."""
    C: tl.constexpr = NUM_EXPERTS * RANK_P
    CG: tl.constexpr = C + NUM_EXPERTS if HAS_ROUTER else C
    pid = tl.program_id(0)
    if pid < programs_a:
        col_blocks = tl.cdiv(K, BLOCK_C)
        j = (pid // col_blocks) * CHUNK_A + tl.arange(0, CHUNK_A)
        cols = ((pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        if FROM_PARTIALS:
            acc = _sum_segments(partial_a_ptr, CG, K, segments, j, cols)
        else:
            acc = _sum_over_tokens(g_ptr, CG, u_ptr, stride_ut, stride_uk, T, K, j, cols, DOT_FP32, BLOCK_M)
        expert, rank, exists = _columns(j, NUM_EXPERTS, RANK, RANK_P)
        in_k = cols[None, :] < K
        if WRITE_A:
            tl.store(da_ptr + (expert * stride_dae + rank * stride_dar)[:, None] + cols[None, :] * stride_dak,
                     acc.to(da_ptr.dtype.element_ty), mask=exists[:, None] & in_k)
        if WRITE_R:
            is_router = (j >= C) & (j < CG)
            router_rows = tl.where(is_router, j - C, 0).to(tl.int64)
            tl.store(dr_ptr + (router_rows * stride_dre)[:, None] + cols[None, :] * stride_drk,
                     acc.to(dr_ptr.dtype.element_ty), mask=is_router[:, None] & in_k)
    elif pid < programs_a + programs_b:
        pid -= programs_a
        col_blocks = tl.cdiv(N, BLOCK_C)
        j = (pid // col_blocks) * CHUNK_B + tl.arange(0, CHUNK_B)
        cols = ((pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        if FROM_PARTIALS:
            acc = _sum_segments(partial_b_ptr, C, N, segments, j, cols)
        else:
            acc = _sum_over_tokens(h_ptr, C, dy_ptr, stride_dt, stride_dn, T, N, j, cols, DOT_FP32, BLOCK_M)
        expert, rank, exists = _columns(j, NUM_EXPERTS, RANK, RANK_P)
        tl.store(db_ptr + (expert * stride_dbe + rank * stride_dbr)[:, None] + cols[None, :] * stride_dbn,
                 acc.to(db_ptr.dtype.element_ty), mask=exists[:, None] & (cols[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Layout:
    """Compile-time shape of the experts: the packed modality -> experts bounds, rank, column counts."""

    def __init__(self, experts_per_modality, rank: int, router_given: bool):
        epm = tuple(experts_per_modality)
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"lora_a: rank must be in [1, {MAX_RANK}] for the Triton backend, got {rank}")
        if max(epm) > MAX_EXPERTS_PER_MODALITY or len(epm) > MAX_MODALITIES or sum(epm) > MAX_EXPERTS:
            raise ValueError(f"experts_per_modality: the Triton backend takes at most {MAX_EXPERTS_PER_MODALITY} "
                             f"experts per modality, {MAX_MODALITIES} modalities and {MAX_EXPERTS} experts, "
                             f"got {epm}")
        if max(epm) > 1 and not router_given:
            raise ValueError("router_weight: required when a modality has more than one expert")
        self.num_modalities = len(epm)
        self.num_experts = sum(epm)
        self.rank = rank
        self.rank_p = _next_pow2(rank)
        self.has_router = max(epm) > 1
        bound, self.bounds = 0, 0
        for m, n in enumerate((0, *epm)):
            bound += n
            self.bounds |= bound << (BOUND_BITS * m)
        self.columns = self.num_experts * self.rank_p                       # C: H's width
        self.grad_columns = self.columns + (self.num_experts if self.has_router else 0)  # G's width
        self.logit_width = max(16, _next_pow2(self.num_experts))            # E_W, >= tl.dot's 16
        self.chunk = min(MAX_CHUNK, max(16, _next_pow2(self.columns)))

    def constexprs(self, dot_fp32: bool) -> dict:
        return dict(BOUNDS=self.bounds, BOUND_BITS=BOUND_BITS, NUM_MODALITIES=self.num_modalities,
                    NUM_EXPERTS=self.num_experts, RANK=self.rank, RANK_P=self.rank_p, HAS_ROUTER=self.has_router,
                    DOT_FP32=dot_fp32, E_W=self.logit_width, CHUNK=self.chunk)


def _check_dtypes(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype == torch.float64:
            raise ValueError(f"{name}: float64 is not supported by the Triton backend (use backend='torch')")


def _dot_fp32(x: torch.Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


def rows_config(dot_fp32: bool) -> dict:
    """Launch meta of the per-token kernels (shrink, grad rows): [64, 64] float32 accumulators over 8 warps."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_K=16 if dot_fp32 else 64, num_warps=8, num_stages=3)


def weight_grads_config(lay: Layout, dot_fp32: bool) -> dict:
    """Launch meta of the weight-gradient reduction: [chunk, BLOCK_C] float32 accumulators."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=1)
    if dot_fp32:
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_C=64, num_warps=4, num_stages=3)


def _router_args(lay: Layout, router_weight, fallback):
    router = router_weight if lay.has_router else fallback
    return router, router.stride(0), router.stride(-1)


def _shrink(u, lora_a, router_weight, ids, lay: Layout, scaling):
    """H [T, C] in u's dtype and the gates [T, E] float32 (None without a router)."""
    T, K = u.shape
    meta = rows_config(_dot_fp32(u))
    h = u.new_empty(T, lay.columns)
    gates = torch.empty(T, lay.num_experts, device=u.device, dtype=torch.float32) if lay.has_router else h
    consts = lay.constexprs(_dot_fp32(u))
    chunk = consts["CHUNK"]
    grid = (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(lay.columns, chunk))
    _shrink_kernel[grid](u, *u.stride(), lora_a, *lora_a.stride(), *_router_args(lay, router_weight, lora_a), ids,
                         h, gates, T, K, float(scaling), **consts, **meta)
    return h, (gates if lay.has_router else None)


def weight_grad_segments(num_tokens: int, col_blocks: int, sms: int, block_m: int) -> int:
    """Token segments of the dx GEMM with the weight gradients: at least MIN_SEGMENTS (W is re-read
    once per row block of a segment), as many as col_blocks * segments programs fit in the waves of
    sms SMs that MIN_SEGMENTS take, and at most one per row block of block_m (the largest BLOCK_M of
    the configs, so no segment is empty)."""
    waves = triton.cdiv(MIN_SEGMENTS * col_blocks, sms)
    return max(1, min(waves * sms // col_blocks, triton.cdiv(num_tokens, block_m)))


def _weight_grads_configs(num_tokens: int, dy: torch.Tensor) -> list:
    return gemm_configs(device_arch(dy.device), t_bucket(num_tokens), _dot_fp32(dy), weight_grads=True)


def max_weight_grad_segments(num_tokens: int, dy: torch.Tensor) -> int:
    """The most segments the dx GEMM with the weight gradients takes: one per row block of the
    largest tile its autotuner may pick (an empty segment would leave its partials unwritten)."""
    return triton.cdiv(num_tokens, max(c.kwargs["BLOCK_M"] for c in _weight_grads_configs(num_tokens, dy)))


def plan_weight_grads(num_tokens: int, out_cols: int, in_cols: int, lay: Layout, dy: torch.Tensor) -> int:
    """Token segments for the dx GEMM that also sums the weight gradients (x's columns out_cols,
    dy's in_cols), or 0 when its float32 partials, written once and read once, would move more bytes
    than the read of dy they save (few tokens, high ranks), or for float32 tensors (the exact-products
    correctness path, whose tiles spilled with the extra work): then the weight-grads pass runs alone."""
    if dy.dtype == torch.float32:
        return 0
    configs = _weight_grads_configs(num_tokens, dy)
    segments = weight_grad_segments(num_tokens, triton.cdiv(out_cols, configs[0].kwargs["BLOCK_N"]),
                                    sm_count(dy.device), max(c.kwargs["BLOCK_M"] for c in configs))
    partial_bytes = segments * (lay.grad_columns * out_cols + lay.columns * in_cols) * 4
    return segments if 2 * partial_bytes <= num_tokens * in_cols * dy.element_size() else 0


def _gemm(out, a, w_in_out, ext, lora_in_out, router_weight, bias, lay: Layout, router_rows: bool,
          weight_grads=None):
    """out = a Wt + ext L (+ bias). w_in_out: (W, stride along IN, stride along OUT); lora_in_out:
    (3-D adapter weights, stride per expert, per rank index, along OUT). weight_grads: (u, H, the
    float32 partials of [dA ; dR] and dB, token segments) for the dx GEMM that also sums them."""
    T, OUT = out.shape
    w, stride_wi, stride_wo = w_in_out
    lw, stride_le, stride_li, stride_lo = lora_in_out
    IN = a.shape[1] if a is not None else 0
    a_arg = a if a is not None else out
    ext_cols = ext.shape[1] if ext is not None else 0
    router, stride_re, stride_ro = _router_args(lay, router_weight, lw) if router_rows else (lw, 0, 0)
    u, h, partial_a, partial_b, segments = weight_grads if weight_grads is not None else (out, out, out, out, 0)

    def grid(meta):
        if segments:
            return (segments * triton.cdiv(OUT, meta["BLOCK_N"]),)
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(OUT, meta["BLOCK_N"]),)

    tma = _tma_descriptors(a, w, stride_wi, out)
    _gemm_kernel[grid](a_arg, *a_arg.stride(), w, stride_wi, stride_wo, ext if ext is not None else out, lw,
                       stride_le, stride_li, stride_lo, router, stride_re, stride_ro,
                       bias if bias is not None else out, out, *out.stride(), *(tma[0] if tma else (None,) * 3),
                       u, *u.stride(), h, partial_a, partial_b, T, IN, OUT, t_bucket(T), segments,
                       EXT=ext_cols, HAS_BIAS=bias is not None, ROUTER_ROWS=router_rows, NUM_EXPERTS=lay.num_experts,
                       RANK=lay.rank, RANK_P=lay.rank_p, DOT_FP32=_dot_fp32(out),
                       BLOCK_J=min(MAX_CHUNK, max(16, _next_pow2(ext_cols))), USE_TMA=tma is not None,
                       W_ROWS_OUT=tma is not None and tma[1], WEIGHT_GRADS=bool(segments))
    return out


def device_arch(device: torch.device) -> int:
    """10 * major + minor of a CUDA device's compute capability; 0 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can copy blocks of: innermost stride 1, base and other stride 16-byte aligned."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0 and min(t.shape) > 0)


def _tma_descriptors(a, w, stride_wi, out):
    """(descriptors of a, W, out; whether W's rows are the outputs) for the GEMM on sm_90+ with
    half-precision tensors TMA can copy, else None (pointer loads). W is described as stored:
    [OUT, IN] when its IN stride is its column stride. Block shapes are placeholders until the
    config's pre-hook sets them."""
    if not TMA_ENABLED or a is None or device_arch(out.device) < TMA_MIN_ARCH \
            or out.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not all(_tma_ready(t) for t in (a, w, out)):
        return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16]) for t in (a, w, out)), \
        stride_wi == w.stride(1)


def _grad_rows(grad_y, lora_b, h, gates, ids, lay: Layout, scaling):
    """G = [dh | dlogit] [T, C (+ E)] in grad_y's dtype."""
    T, N = grad_y.shape
    meta = rows_config(_dot_fp32(grad_y))
    g = grad_y.new_empty(T, lay.grad_columns)
    _grad_rows_kernel[(triton.cdiv(T, meta["BLOCK_M"]),)](
        grad_y, *grad_y.stride(), lora_b, *lora_b.stride(), h, gates if gates is not None else h, ids, g, T, N,
        float(scaling), **lay.constexprs(_dot_fp32(grad_y)), BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_K"],
        num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    return g


def _weight_grads(g, h, u, grad_y, lay: Layout, lora_a, lora_b, router_weight, need_a, need_r, need_lb,
                  partials=None):
    """(dA, dR, dB) in the weights' dtypes and layouts (None where not needed), one launch; from the
    dx GEMM's per-segment partials ([S, CG, K], [S, C, N] float32) when given."""
    T, K = u.shape
    N = grad_y.shape[1]
    meta = weight_grads_config(lay, _dot_fp32(u))
    chunk_a = min(MAX_CHUNK, max(16, _next_pow2(lay.grad_columns)))
    chunk_b = min(MAX_CHUNK, max(16, _next_pow2(lay.columns)))
    need_r = need_r and lay.has_router
    programs_a = triton.cdiv(lay.grad_columns, chunk_a) * triton.cdiv(K, meta["BLOCK_C"]) if need_a or need_r else 0
    programs_b = triton.cdiv(lay.columns, chunk_b) * triton.cdiv(N, meta["BLOCK_C"]) if need_lb else 0
    da = torch.empty_like(lora_a) if need_a else None
    dr = torch.empty_like(router_weight) if need_r else None
    db = torch.empty_like(lora_b) if need_lb else None
    if programs_a + programs_b:
        some = da if da is not None else (dr if dr is not None else db)
        _weight_grads_kernel[(programs_a + programs_b,)](
            g if g is not None else h, h, u, *u.stride(), grad_y, *grad_y.stride(),
            *(partials if partials is not None else (h, h)), partials[0].shape[0] if partials is not None else 0,
            *((da, *da.stride()) if da is not None else (some, 0, 0, 0)),
            *((dr, *dr.stride()) if dr is not None else (some, 0, 0)),
            *((db, *db.stride()) if db is not None else (some, 0, 0, 0)), T, K, N, programs_a, programs_b,
            NUM_EXPERTS=lay.num_experts, RANK=lay.rank, RANK_P=lay.rank_p, HAS_ROUTER=lay.has_router,
            WRITE_A=need_a, WRITE_R=need_r, FROM_PARTIALS=partials is not None, DOT_FP32=_dot_fp32(u),
            CHUNK_A=chunk_a, CHUNK_B=chunk_b, **meta)
    return da, dr, db


def saved_like(x, lora_a, router_weight, options: RoutedLoraOptions) -> RoutedLoraSaved:
    """Empty tensors shaped like what the forward keeps for the backward (H, gates): for fake tensors."""
    lay = Layout(options.experts_per_modality, lora_a.shape[1], router_weight is not None)
    gates = x.new_empty(x.shape[0], lay.num_experts, dtype=torch.float32) if lay.has_router else x.new_empty(0)
    return RoutedLoraSaved(x.new_empty(x.shape[0], lay.columns), gates)


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        options: RoutedLoraOptions) -> tuple[torch.Tensor, RoutedLoraSaved]:
    """(y, (H, gates)): the forward and what the backward reuses (gates is empty without a router)."""
    experts_per_modality, scaling = options.experts_per_modality, options.scaling
    _check_dtypes(x=x, weight=weight, bias=bias, lora_input=lora_input, lora_a=lora_a, lora_b=lora_b,
                  router_weight=router_weight)
    lay = Layout(experts_per_modality, lora_a.shape[1], router_weight is not None)
    T = x.shape[0]
    y = x.new_empty(T, weight.shape[0])
    if T == 0:
        return y, saved_like(x, lora_a, router_weight, options)
    u = x if lora_input is None else lora_input
    h, gates = _shrink(u, lora_a, router_weight, plan.modality, lay, scaling)
    # W^T as [K, N]: stride along K is W's column stride. B_e^T as [r, N] per expert.
    _gemm(y, x, (weight, weight.stride(1), weight.stride(0)), h,
          (lora_b, lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), None, bias, lay, router_rows=False)
    return y, RoutedLoraSaved(h, gates if gates is not None else x.new_empty(0))


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                         options: RoutedLoraOptions, needs: RoutedLoraNeeds,
                         saved: RoutedLoraSaved | None = None) -> RoutedLoraGrads:
    """``saved`` is the forward's (H, gates) (recomputed, one extra pass over u, when not given)."""
    experts_per_modality, scaling = options.experts_per_modality, options.scaling
    _check_dtypes(grad_y=grad_y, x=x, weight=weight, bias=bias, lora_input=lora_input, lora_a=lora_a,
                  lora_b=lora_b, router_weight=router_weight)
    lay = Layout(experts_per_modality, lora_a.shape[1], router_weight is not None)
    need_dx, need_du, need_w, need_b, need_a, need_lb, need_r = (bool(n) for n in needs)
    need_du = need_du and lora_input is not None
    need_r = need_r and router_weight is not None
    dw = (grad_y.t() @ x.to(grad_y.dtype)).to(weight.dtype) if need_w else None
    dbias = grad_y.sum(0, dtype=torch.float32).to(bias.dtype) if need_b and bias is not None else None
    if x.shape[0] == 0:
        def zeros(need, t):
            return torch.zeros_like(t) if need else None
        return RoutedLoraGrads(x=zeros(need_dx, x), lora_input=zeros(need_du, lora_input), weight=dw, bias=dbias,
                               lora_a=zeros(need_a, lora_a), lora_b=zeros(need_lb, lora_b),
                               router_weight=zeros(need_r, router_weight))

    separate = lora_input is not None
    u = lora_input if separate else x
    if saved is None:
        h, gates = _shrink(u, lora_a, router_weight, plan.modality, lay, scaling)
    else:
        h, gates = saved.rank, (saved.gates if lay.has_router else None)
    g = None
    if need_a or need_r or need_du or (need_dx and not separate):
        g = _grad_rows(grad_y, lora_b, h, gates, plan.modality, lay, scaling)
    # dx = dy W (+ dh A + dlogit R when the adapters see x); d lora_input = dh A + dlogit R.
    a_by_rank = (lora_a, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    partials = fused = None
    if need_dx and not separate and (need_a or need_r or need_lb):
        segments = plan_weight_grads(x.shape[0], x.shape[1], grad_y.shape[1], lay, grad_y)
        if segments:
            partials = (torch.empty(segments, lay.grad_columns, x.shape[1], device=x.device, dtype=torch.float32),
                        torch.empty(segments, lay.columns, grad_y.shape[1], device=x.device, dtype=torch.float32))
            fused = (x, h, *partials, segments)
    dx = du = None
    if need_dx:
        dx = _gemm(torch.empty_like(x, memory_format=torch.contiguous_format), grad_y,
                   (weight, weight.stride(0), weight.stride(1)), None if separate else g, a_by_rank, router_weight,
                   None, lay, router_rows=lay.has_router and not separate, weight_grads=fused)
    if need_du:
        du = _gemm(torch.empty_like(u, memory_format=torch.contiguous_format), None, (weight, 0, 0), g, a_by_rank,
                   router_weight, None, lay, router_rows=lay.has_router)
    da, dr, db = _weight_grads(g, h, u, grad_y, lay, lora_a, lora_b, router_weight, need_a, need_r, need_lb,
                               partials)
    if need_r and dr is None:
        dr = torch.zeros_like(router_weight)  # without a multi-expert modality the router is unused
    return RoutedLoraGrads(x=dx, lora_input=du, weight=dw, bias=dbias, lora_a=da, lora_b=db, router_weight=dr)
