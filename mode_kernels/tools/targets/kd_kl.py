"""Compile targets of the KD-KL kernels (``mode_kernels/triton/kd_kl.py``), for ``compile_check``."""
from __future__ import annotations

from ...triton.kd_kl import _CONFIGS, _kd_kl_bwd_kernel, _kd_kl_fwd_bwd_kernel, _kd_kl_fwd_kernel


def compile_targets(default_only: bool = False):
    """(name, jit fn, signature, constexprs, num_warps, num_stages) for every kernel, input
    dtype, mask variant and autotune config, for mode_kernels.tools.compile_check (default_only:
    bf16 with a mask and the config used for long rows)."""
    targets = []
    configs = [c for c in _CONFIGS if c[:2] == (1, 4096)] if default_only else _CONFIGS
    for dtype in ("bf16",) if default_only else ("bf16", "fp16", "fp32"):
        for r, v, w, st in configs:
            for has_mask in (True,) if default_only else (True, False):
                consts = {"HAS_MASK": has_mask, "BLOCK_R": r, "BLOCK_V": v}
                rows = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "mask_ptr": "*i1"}
                fwd = {**rows, "loss_ptr": "*fp32", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "n_rows": "i32",
                       "n_cols": "i32", "lo": "i32", "stride_s": "i32:16", "stride_t": "i32:16", "scale2": "fp32",
                       "temperature": "fp32"}
                bwd = {"grad_rows_ptr": "*fp32", **rows, "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32",
                       "d_student_ptr": f"*{dtype}", "n_rows": "i32", "n_cols": "i32", "lo": "i32", "hi": "i32",
                       "stride_s": "i32:16", "stride_t": "i32:16", "stride_d": "i32:16", "scale2": "fp32",
                       "temperature": "fp32"}
                # The fused-linear op's row pass: float32 logits of a chunk, d logits in the dots' dtype.
                fwd_bwd = {"grad_rows_ptr": "*fp32", "student_ptr": "*fp32", "teacher_ptr": "*fp32",
                           "mask_ptr": "*i1", "loss_ptr": "*fp32", "d_student_ptr": f"*{dtype}", "n_rows": "i32",
                           "n_cols": "i32", "stride_s": "i32:16", "stride_t": "i32:16", "stride_d": "i32:16",
                           "scale2": "fp32", "temperature": "fp32"}
                tag = f"[{dtype}{' mask' if has_mask else ''}] R{r} V{v} w{w} s{st}"
                targets.append((f"fwd{tag}", _kd_kl_fwd_kernel, fwd, consts, w, st))
                targets.append((f"bwd{tag}", _kd_kl_bwd_kernel, bwd, consts, w, st))
                targets.append((f"fwd_bwd{tag}", _kd_kl_fwd_bwd_kernel, fwd_bwd, consts, w, st))
    return targets
