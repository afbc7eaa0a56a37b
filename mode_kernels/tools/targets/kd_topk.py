"""Compile targets of the top-k KD kernels (``mode_kernels/triton/kd_topk.py``), for ``compile_check``."""
from __future__ import annotations

import torch

from ...triton.fused_linear_kd_kl import _dot_args
from ...triton.kd_topk import MAX_SELECT_K, _select_kernel, _topk_grad_kernel, grad_config, k_pad, select_config

_SIG_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _launch(config: dict) -> tuple[dict, int, int, str]:
    """(block constexprs, num_warps, num_stages, a label) of a launcher's config."""
    blocks = {name: value for name, value in config.items() if name.startswith("BLOCK_")}
    label = " ".join(f"{name[6:]}{value}" for name, value in blocks.items())
    return blocks, config["num_warps"], config["num_stages"], f"{label} w{config['num_warps']} s{config['num_stages']}"


def compile_targets(default_only: bool = False):
    """Every padded k the selection's launcher picks (64 to ``MAX_SELECT_K``), with and without the teacher's
    logsumexp; the grad kernel with d hidden, with d logits only (a trainable weight without d hidden) and loss
    only, its teacher logits float32 (the selection's) or in the operand's dtype (a cache's), int64 ids (the
    API's); each operand dtype. default_only: bf16, k 256 and each kernel's main variant."""
    targets = []
    k_padded_all = [k_pad(MAX_SELECT_K)] if default_only else sorted({k_pad(k) for k in (1, 128, 256)})
    for operand in (torch.bfloat16,) if default_only else (torch.bfloat16, torch.float16, torch.float32):
        dt = _SIG_DTYPE[operand]
        dot = _dot_args(operand)
        for k_padded in k_padded_all:
            blocks, warps, stages, label = _launch(select_config(k_padded, operand))
            for lse in (False,) if default_only else (False, True):
                sig = {"ht_ptr": f"*{dt}", "wt_ptr": f"*{dt}", "ids_ptr": "*i64", "values_ptr": "*fp32",
                       "lse_ptr": "*fp32", "n_rows": "i32", "n_vocab": "i32", "H": "i32:16", "k": "i32", "lo": "i32",
                       "stride_ht": "i32:16", "stride_wt": "i32:16", "stride_out": "i32", "lse_scale2": "fp32"}
                consts = {"LSE": lse, "K_PAD": k_padded, **dot, **blocks}
                targets.append((f"select[{dt}{' lse' if lse else ''}] K{k_padded} {label}", _select_kernel, sig,
                                consts, warps, stages))
        blocks, warps, stages, label = _launch(grad_config(operand))
        needs = ((True, True),) if default_only else ((True, True), (True, False), (False, False))
        for tv in ("fp32",) if default_only or dt == "fp32" else ("fp32", dt):
            for need_grad, need_dh in needs:
                sig = {"ids_ptr": "*i64", "tv_ptr": f"*{tv}", "s_ptr": "*fp32", "d_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                       "dh_ptr": f"*{dt}", "mask_ptr": "*i1", "row_weight_ptr": "*fp32", "loss_ptr": "*fp32",
                       "n_rows": "i32", "n_vocab": "i32", "H": "i32:16", "k": "i32", "lo": "i32", "stride_ids": "i32",
                       "stride_tv": "i32", "stride_s": "i32:16", "stride_d": "i32:16", "stride_w": "i32:16",
                       "stride_dh": "i32:16", "t_min": "fp32", "scale2": "fp32", "temperature": "fp32"}
                consts = {"HAS_MASK": True, "NEED_GRAD": need_grad, "NEED_DH": need_dh, **dot, **blocks}
                form = "d hidden" if need_dh else "d logits" if need_grad else "loss"
                targets.append((f"topk_grad[{dt} {form} t {tv}] {label}", _topk_grad_kernel, sig, consts, warps,
                                stages))
    return targets
