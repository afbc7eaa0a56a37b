"""Compile targets of the routed-LoRA kernels (``mode_kernels/triton/routed_lora.py``): every
kernel, variant and config its launchers and autotuner can pick, for ``compile_check``."""
from __future__ import annotations

import triton

from ...routing import DEFAULT_BLOCK_M as DEFAULT_PLAN_BLOCK_M
from ...triton.routed_lora import (
    _expand_configs,
    _expand_kernel,
    _grouped_outer_config,
    _grouped_outer_kernel,
    _Layout,
    _shrink_backward_kernel,
    _shrink_config,
    _shrink_kernel,
)
from ..compile_check import CompileTarget

# Pointers to float32 intermediates, int64 and int32 metadata; every other pointer is an activation or weight.
_POINTER_TYPES = dict(hg_ptr="*fp32", dh_ptr="*fp32", dlogit_ptr="*fp32", lora_ptr="*fp32", left_ptr="*fp32",
                      router_out_ptr="*fp32", order_ptr="*i64", offsets_ptr="*i64", tiles_ptr="*i32",
                      expert_offsets_ptr="*i32")


def _compile_target(name, kernel, dtype, unit_strides, constexprs, num_warps, num_stages, pointer_types=None):
    """A CompileTarget for contiguous tensors: unit strides are constants, other strides and sizes multiples of 16."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    pointers = {**_POINTER_TYPES, **(pointer_types or {})}
    constexprs = {**constexprs, **{stride: 1 for stride in unit_strides}}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            continue
        if arg.endswith("_ptr"):
            signature[arg] = pointers.get(arg, f"*{dtype}")
        elif arg == "scaling":
            signature[arg] = "fp32"
        elif arg.startswith("stride") or arg in ("K", "N", "C", "IN", "OUT"):
            signature[arg] = "i32:16"
        else:
            signature[arg] = "i32"
    return CompileTarget(name, fn, signature, constexprs, num_warps, num_stages)


def compile_targets(default_only: bool = False, arch: int = 90):
    """Every kernel, variant and config the launchers and the autotuner can pick on ``arch``: for
    bf16 every expert layout below with every fused-GEMM config; fp16 (same code as bf16) and
    float32 (exact products, the slow correctness path) for the MoDE layout. default_only: the
    MoDE layout (experts (4, 1), r 8) in bf16 with the first fused-GEMM config."""
    configs = _expand_configs(arch, DEFAULT_PLAN_BLOCK_M)
    if default_only:
        plans = [("bf16", (4, 1), 8, configs[:1])]
    else:
        layouts = (((4, 1), 8), ((4, 1), 64), ((16,), 16), ((1, 1), 4))
        plans = [("bf16", layout, rank, configs) for layout, rank in layouts]
        plans += [("fp16", (4, 1), 8, configs[:1]),
                  ("fp32", (4, 1), 8, _expand_configs(arch, DEFAULT_PLAN_BLOCK_M, dot_fp32=True))]
    targets = []
    for dtype, experts, rank, expand_configs in plans:
        lay = _Layout(experts, rank, True)
        tag = f"{dtype} E{experts} r{rank}"
        layout = dict(DOT_FP32=dtype == "fp32", HAS_ROUTER=lay.has_router, RANK=rank, RANK_P=lay.rank_p,
                      BLOCK_E=lay.block_e)
        meta = _shrink_config(DEFAULT_PLAN_BLOCK_M, dtype == "fp32")
        launch = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        shrink = dict(layout, SUB_TILES=DEFAULT_PLAN_BLOCK_M // meta["BLOCK_M"], **meta)
        targets.append(_compile_target(f"shrink[{tag}]", _shrink_kernel, dtype,
                                       ("stride_uk", "stride_ak", "stride_rk"), shrink, **launch))
        targets.append(_compile_target(f"shrink_backward[{tag}]", _shrink_backward_kernel, dtype,
                                       ("stride_uk", "stride_ak", "stride_rk", "stride_dyn", "stride_br"),
                                       shrink, **launch))
        meta = _grouped_outer_config(lay, dtype == "fp32")
        launch = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        for has_router in sorted({False, lay.has_router}):
            targets.append(_compile_target(
                f"grouped_outer[{tag}{' router' if has_router else ''}]", _grouped_outer_kernel, dtype,
                ("stride_rc",), dict(DOT_FP32=layout["DOT_FP32"], HAS_ROUTER=has_router, RANK_P=lay.rank_p,
                                     BLOCK_E=lay.block_e, **meta), **launch, pointer_types=dict(out_ptr="*fp32")))
        for i, config in enumerate(expand_configs):
            tiles = " ".join(f"{k}{v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
            launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            expand = dict(layout, PLAN_BLOCK_M=DEFAULT_PLAN_BLOCK_M, **config.kwargs)
            # y = x W^T + b + h' B^T: W^T and B^T are read along W's rows (K) and B's rank.
            targets.append(_compile_target(f"expand[forward {tag}] {tiles}", _expand_kernel, dtype,
                                           ("stride_ai", "stride_wi", "stride_lwi", "stride_oo"),
                                           dict(expand, HAS_BASE=True, HAS_BIAS=True, HAS_ROUTER=False), **launch))
            # dx = dy W + dh A + dlogit R.
            targets.append(_compile_target(f"expand[dx {tag}] {tiles}", _expand_kernel, dtype,
                                           ("stride_ai", "stride_wo", "stride_lwo", "stride_ro", "stride_oo"),
                                           dict(expand, HAS_BASE=True, HAS_BIAS=False), **launch))
            if i == 0:  # d lora_input = dh A + dlogit R (no base GEMM)
                targets.append(_compile_target(f"expand[d_lora_input {tag}] {tiles}", _expand_kernel, dtype,
                                               ("stride_ai", "stride_wi", "stride_wo", "stride_lwo", "stride_ro",
                                                "stride_oo"), dict(expand, HAS_BASE=False, HAS_BIAS=False),
                                               **launch))
    return targets
