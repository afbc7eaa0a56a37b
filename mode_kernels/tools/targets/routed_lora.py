"""Compile targets of the routed-LoRA kernels (``mode_kernels/triton/routed_lora.py``): every
kernel, variant and config its launchers and autotuner can pick, for ``compile_check``."""
from __future__ import annotations

from ...triton.routed_lora import (
    DECODE_TOKENS,
    MAX_CHUNK,
    T_BUCKETS,
    TMA_MIN_ARCH,
    Layout,
    _gemm_kernel,
    _grad_rows_kernel,
    _next_pow2,
    _shrink_kernel,
    _weight_grads_kernel,
    gemm_configs,
    rows_config,
    weight_grads_config,
)
from ..compile_check import CompileTarget

# Pointers that are not activations or weights: float32 gates and weight-gradient partials, int32 modality ids.
_POINTER_TYPES = dict(gates_ptr="*fp32", ids_ptr="*i32", partial_a_ptr="*fp32", partial_b_ptr="*fp32")
# Expert layouts compiled: every layout the tests cover at rank 8, every rank at MoDE's (4, 1).
LAYOUTS = [((4, 1), 8), ((2, 1), 8), ((3, 1), 8), ((8, 1), 8), ((16,), 8), ((1, 1), 8), ((2, 2), 8),
           ((4, 1), 4), ((4, 1), 6), ((4, 1), 16), ((4, 1), 32), ((4, 1), 64)]
_LARGE_BUCKET = 2 * T_BUCKETS[-1]


def _compile_target(name, fn, dtype, unit_strides, constexprs, num_warps, num_stages, gemm=False, descriptors=None):
    """A CompileTarget for contiguous tensors: unit strides are constants, other strides and sizes multiples of 16.
    descriptors: TMA descriptor argument -> block shape (the others, if any, are None)."""
    constexprs = {**constexprs, **{stride: 1 for stride in unit_strides}}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            continue
        if arg.endswith("_desc"):
            if descriptors:
                signature[arg] = f"tensordesc<{dtype}[{','.join(map(str, descriptors[arg]))}]>"
            else:
                constexprs[arg] = None
            continue
        if arg.endswith("_ptr"):
            signature[arg] = _POINTER_TYPES.get(arg, f"*{dtype}")
        elif arg == "scaling":
            signature[arg] = "fp32"
        elif arg.startswith("stride") or arg in ("K", "N", "IN", "OUT"):
            signature[arg] = "i32:16"
        else:
            signature[arg] = "i32"
    return CompileTarget(name, fn, signature, constexprs, num_warps, num_stages, gemm, bool(descriptors))


def _launch(meta: dict) -> tuple[dict, dict]:
    meta = dict(meta)
    return meta, dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))


def _per_token_targets(lay: Layout, dtype: str, tag: str) -> list[CompileTarget]:
    fp32 = dtype == "fp32"
    consts = lay.constexprs(fp32)
    meta, launch = _launch(rows_config(fp32))
    targets = [
        _compile_target(f"shrink[{tag}]", _shrink_kernel, dtype, ("stride_uk", "stride_ak", "stride_rk"),
                        {**consts, **meta}, **launch),
        _compile_target(f"grad_rows[{tag}]", _grad_rows_kernel, dtype, ("stride_dn", "stride_br"),
                        {**consts, "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_K"]}, **launch),
    ]
    meta, launch = _launch(weight_grads_config(lay, fp32))
    chunks = dict(CHUNK_A=min(MAX_CHUNK, max(16, _next_pow2(lay.grad_columns))),
                  CHUNK_B=min(MAX_CHUNK, max(16, _next_pow2(lay.columns))))
    for from_partials in (False, True):
        targets.append(_compile_target(
            f"weight_grads[{tag}{' from partials' if from_partials else ''}]", _weight_grads_kernel, dtype,
            ("stride_uk", "stride_dn", "stride_dak", "stride_drk", "stride_dbr"),
            dict(NUM_EXPERTS=lay.num_experts, RANK=lay.rank, RANK_P=lay.rank_p, HAS_ROUTER=lay.has_router,
                 WRITE_A=True, WRITE_R=lay.has_router, FROM_PARTIALS=from_partials, DOT_FP32=fp32, **chunks, **meta),
            **launch))
    return targets


def _gemm_targets(lay: Layout, dtype: str, tag: str, configs, tma: bool = False,
                  weight_grads: bool = False) -> list[CompileTarget]:
    """The forward and dx GEMMs for each config, or (weight_grads) the dx GEMM that also sums the
    weight gradients; tma: with TMA descriptors for x/dy, W and the output (what the launcher picks
    on sm_90 for aligned half-precision tensors), else pointer loads."""
    fp32 = dtype == "fp32"
    layout = dict(NUM_EXPERTS=lay.num_experts, RANK=lay.rank, RANK_P=lay.rank_p, DOT_FP32=fp32, USE_TMA=tma)
    targets = []
    for config in configs:
        tiles = " ".join(f"{k}{v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
        tiles += " tma" if tma else ""
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        bm, bn, bk = (config.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if not weight_grads:
            # y = [x | H] [W^T ; B_cat^T] + b: W^T read along W's rows (K), B^T along B's rank.
            fwd = dict(layout, EXT=lay.columns, HAS_BIAS=True, ROUTER_ROWS=False, W_ROWS_OUT=True, WEIGHT_GRADS=False,
                       BLOCK_J=min(MAX_CHUNK, _next_pow2(lay.columns)), **config.kwargs)
            targets.append(_compile_target(
                f"gemm[forward {tag}] {tiles}", _gemm_kernel.fn, dtype, ("stride_ai", "stride_wi", "stride_li",
                                                                         "stride_oo"), fwd, **launch,
                gemm=not fp32, descriptors=tma and dict(a_desc=(bm, bk), w_desc=(bn, bk), out_desc=(bm, bn))))
        # dx = [dy | dh | dlogit] [W ; A_cat ; R], alone or summing the weight gradients' partials.
        dx = dict(layout, EXT=lay.grad_columns, HAS_BIAS=False, ROUTER_ROWS=lay.has_router, W_ROWS_OUT=False,
                  WEIGHT_GRADS=weight_grads, BLOCK_J=min(MAX_CHUNK, _next_pow2(lay.grad_columns)), **config.kwargs)
        targets.append(_compile_target(
            f"gemm[dx{' + weight grads' if weight_grads else ''} {tag}] {tiles}", _gemm_kernel.fn, dtype,
            ("stride_ai", "stride_wo", "stride_lo", "stride_ro", "stride_oo", "stride_uk"), dx, **launch,
            gemm=not fp32, descriptors=tma and dict(a_desc=(bm, bk), w_desc=(bk, bn), out_desc=(bm, bn))))
    return targets


def compile_targets(default_only: bool = False, arch: int = 90):
    """Every kernel and config the launchers and the autotuner can pick on ``arch``: for bf16 every
    layout in LAYOUTS (per-token kernels, the first large-T and the first decode GEMM config, every
    config of the dx GEMM that sums the weight gradients), every GEMM config for MoDE's layout
    ((4, 1), r 8); fp16 (same code as bf16) for MoDE's layout; float32 (exact products, the slow
    correctness path, which keeps the weight-grads pass apart) for every layout. On sm_90 the
    half-precision GEMMs are the TMA variants, plus the pointer variant of the first config per layout
    (tensors TMA cannot copy). default_only: MoDE's layout in bf16, the first large-T and the first
    decode GEMM config and the first config of the dx GEMM with the weight gradients (TMA on sm_90)."""
    tma = arch >= TMA_MIN_ARCH
    large = gemm_configs(arch, _LARGE_BUCKET, False)
    decode = gemm_configs(arch, DECODE_TOKENS, False)
    fused = gemm_configs(arch, _LARGE_BUCKET, False, weight_grads=True)
    firsts = large[:1] + decode[:1]
    mode = Layout((4, 1), 8, True)

    def half(lay, dtype, tag, configs, fused_configs):
        targets = _gemm_targets(lay, dtype, tag, configs, tma) + _gemm_targets(lay, dtype, tag, fused_configs, tma,
                                                                                weight_grads=True)
        if tma and not default_only:  # the pointer fallback
            targets += _gemm_targets(lay, dtype, tag, configs[:1]) + _gemm_targets(lay, dtype, tag, fused_configs[:1],
                                                                                   weight_grads=True)
        return targets

    if default_only:
        return _per_token_targets(mode, "bf16", "bf16 E(4, 1) r8") + half(mode, "bf16", "bf16 E(4, 1) r8", firsts,
                                                                          fused[:1])
    targets = []
    for experts, rank in LAYOUTS:
        lay = Layout(experts, rank, True)
        for dtype in ("bf16", "fp32"):
            tag = f"{dtype} E{experts} r{rank}"
            targets += _per_token_targets(lay, dtype, tag)
            if dtype == "fp32":
                targets += _gemm_targets(lay, dtype, tag, gemm_configs(arch, _LARGE_BUCKET, True))
            elif (experts, rank) == ((4, 1), 8):
                targets += half(lay, dtype, tag, large + decode, fused)
            else:
                targets += half(lay, dtype, tag, firsts, fused)
    targets += _per_token_targets(mode, "fp16", "fp16 E(4, 1) r8") + half(mode, "fp16", "fp16 E(4, 1) r8", firsts,
                                                                          fused[:1])
    return targets
