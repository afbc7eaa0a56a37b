"""Compile targets of the KD-KL kernels (``mode_kernels/triton/kd_kl.py``), for ``compile_check``."""
from __future__ import annotations

from ...triton.kd_kl import (
    _CONFIGS,
    _PARTIAL_CONFIGS,
    MAX_SPLITS,
    MERGE_TILE,
    MERGE_WARPS,
    _kd_kl_bwd_kernel,
    _kd_kl_fwd_bwd_kernel,
    _kd_kl_fwd_kernel,
    _kd_kl_merge_kernel,
    _kd_kl_partial_stats_kernel,
)


def compile_targets(default_only: bool = False):
    """(name, jit fn, signature, constexprs, num_warps, num_stages) for every kernel, input
    dtype, mask variant and autotune config, for mode_kernels.tools.compile_check (default_only:
    bf16 with a mask and the config used for long rows). The split over the vocabulary adds the
    per-segment statistics kernel (every one of its configs) and the merge (its smallest and
    largest split counts: at most MAX_SPLITS + 1 segments, so SPLITS up to twice MAX_SPLITS)."""
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
                       "split_cols": "i32", "stride_s": "i32:16", "stride_t": "i32:16", "stride_d": "i32:16",
                       "scale2": "fp32", "temperature": "fp32"}
                # The fused-linear op's row pass: float32 logits of a chunk, d logits in the dots' dtype.
                fwd_bwd = {"grad_rows_ptr": "*fp32", "student_ptr": "*fp32", "teacher_ptr": "*fp32",
                           "mask_ptr": "*i1", "loss_ptr": "*fp32", "d_student_ptr": f"*{dtype}", "n_rows": "i32",
                           "n_cols": "i32", "stride_s": "i32:16", "stride_t": "i32:16", "stride_d": "i32:16",
                           "scale2": "fp32", "temperature": "fp32"}
                tag = f"[{dtype}{' mask' if has_mask else ''}] R{r} V{v} w{w} s{st}"
                targets.append((f"fwd{tag}", _kd_kl_fwd_kernel, fwd, consts, w, st))
                targets.append((f"bwd{tag}", _kd_kl_bwd_kernel, bwd, consts, w, st))
                # Split over the columns, split_cols is a power of two >= 1024 (specialised as such).
                bwd_split = {**bwd, "split_cols": "i32:16"}
                targets.append((f"bwd_split{tag}", _kd_kl_bwd_kernel, bwd_split, consts, w, st))
                targets.append((f"fwd_bwd{tag}", _kd_kl_fwd_bwd_kernel, fwd_bwd, consts, w, st))
    for dtype in ("bf16",) if default_only else ("bf16", "fp16", "fp32"):
        for r, v, w, st in [c for c in _PARTIAL_CONFIGS if c[:2] == (1, 4096)] if default_only else _PARTIAL_CONFIGS:
            for has_mask in (True,) if default_only else (True, False):
                consts = {"HAS_MASK": has_mask, "BLOCK_R": r, "BLOCK_V": v}
                # The split's statistics pass: logits of the op's dtype, or float32 of the fused op.
                partial = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "mask_ptr": "*i1",
                           "stats_ptr": "*fp32", "n_rows": "i32", "lo": "i32", "hi": "i32", "split_cols": "i32:16",
                           "n_splits": "i32", "stride_s": "i32:16", "stride_t": "i32:16", "scale2": "fp32"}
                tag = f"[{dtype}{' mask' if has_mask else ''}] R{r} V{v} w{w} s{st}"
                targets.append((f"partial_stats{tag}", _kd_kl_partial_stats_kernel, partial, consts, w, st))
    merge = {"stats_ptr": "*fp32", "mask_ptr": "*i1", "loss_ptr": "*fp32", "lse_s_ptr": "*fp32",
             "lse_t_ptr": "*fp32", "n_rows": "i32", "n_splits": "i32", "temperature": "fp32"}
    for splits in (2 * MAX_SPLITS,) if default_only else (2, 2 * MAX_SPLITS):
        for has_mask in (True,) if default_only else (True, False):
            consts = {"HAS_MASK": has_mask, "BLOCK_R": max(1, MERGE_TILE // splits), "SPLITS": splits}
            targets.append((f"merge[{'mask ' if has_mask else ''}S{splits}] w{MERGE_WARPS}", _kd_kl_merge_kernel,
                            merge, consts, MERGE_WARPS, 1))
    return targets
