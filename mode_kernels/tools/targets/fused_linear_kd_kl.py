"""Compile targets of the fused-linear KD-KL kernels (``mode_kernels/triton/fused_linear_kd_kl.py``),
for ``compile_check``."""
from __future__ import annotations

import torch

from ...triton.fused_linear_kd_kl import (
    _MATMUL_CONFIGS,
    _TILE_CONFIGS,
    GROUP_P,
    _dot_args,
    _logits_kernel,
    _matmul_kernel,
)

_SIG_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_targets(default_only: bool = False):
    """(name, jit fn, signature, constexprs, num_warps, num_stages) for every kernel, operand
    dtype, variant and autotune config the launchers can pick, for mode_kernels.tools.compile_check
    (default_only: bf16 and each kernel's first config). H and the row strides are multiples
    of 16 in the shapes that matter (H = 4096), vocab sizes need not be (MoDE's slice is 8194);
    unit strides are constants, as Triton specialises them."""
    targets = []
    for operand in (torch.bfloat16,) if default_only else (torch.bfloat16, torch.float16, torch.float32):
        dt = _SIG_DTYPE[operand]
        dot = _dot_args(operand)
        tiles, gemms = _TILE_CONFIGS[operand.itemsize], _MATMUL_CONFIGS[operand.itemsize]
        # The dense loss: both logits, the teacher's weight its own or shared; the top-k forms: the student's
        # logits and the d logits buffer zeroed.
        variants = ((True, False, False), (True, False, True), (False, True, True))
        for p, v, h, w, st in tiles[:1] if default_only else tiles:
            for teacher, zero_d, shared in variants[:1] if default_only else variants:
                consts = {"TEACHER": teacher, "ZERO_D": zero_d, "SHARED_WEIGHT": shared, "GROUP_P": GROUP_P, **dot,
                          "BLOCK_P": p, "BLOCK_V": v, "BLOCK_H": h}
                sig = {"hs_ptr": f"*{dt}", "ht_ptr": f"*{dt}", "ws_ptr": f"*{dt}", "wt_ptr": f"*{dt}",
                       "s_ptr": "*fp32", "t_ptr": "*fp32", "d_ptr": f"*{dt}", "n_rows": "i32", "n_vocab": "i32",
                       "H": "i32:16", "stride_hs": "i32:16", "stride_ht": "i32:16", "stride_ws": "i32:16",
                       "stride_wt": "i32:16", "stride_out": "i32:16", "stride_d": "i32:16"}
                form = "top-k student" if zero_d else "shared" if shared else ""
                tag = f"[{dt}{' ' + form if form else ''}] P{p} V{v} H{h} w{w} s{st}"
                targets.append((f"logits{tag}", _logits_kernel, sig, consts, w, st))
        # d hidden = dl @ W (a row-major, out in hidden's dtype); d weight (+)= dl^T @ hidden
        # (a transposed, float32 out, written by the first chunk, accumulated by the others).
        # The teacher's selection above the selection kernel's k: logits = hidden @ W^T (b = W transposed: unit
        # stride_bk; float32 out).
        uses = (("d_hidden", "stride_ak", "stride_bn", dt, False),
                ("logits_selection", "stride_ak", "stride_bk", "fp32", False),
                ("d_weight", "stride_am", "stride_bn", "fp32", False),
                ("d_weight_acc", "stride_am", "stride_bn", "fp32", True))
        for m, n, k, w, st in gemms[:1] if default_only else gemms:
            for use, unit, b_unit, out, accumulate in uses[:2] if default_only else uses:
                strides = {a: "i32:16" for a in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm")
                           if a not in (unit, b_unit)}
                sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{out}", "M": "i32", "N": "i32:16",
                       "K": "i32", **strides}
                consts = {unit: 1, b_unit: 1, "stride_cn": 1, "ACCUMULATE": accumulate, **dot,
                          "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
                targets.append((f"matmul[{use} {dt}] M{m} N{n} K{k} w{w} s{st}", _matmul_kernel, sig, consts, w, st))
    return targets
