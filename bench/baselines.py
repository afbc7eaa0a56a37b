"""Naive baselines, written from the method's description: what a user would run without mode-kernels.

They compute the same values as ``mk.modality_lora_linear`` and ``mk.kd_kl_loss`` (checked in
tests/bench/test_baselines.py) so the benchmark compares equal work:

- ``naive_mode_lora``: MoDE's official layer style. Base ``F.linear``, then per modality a boolean-mask
  gather of its tokens, one LoRA per expert (two small GEMMs each), float32 router softmax, and a
  scatter-add (``index_put`` with accumulate) of the mixture back into the output.
- ``peft_loop_lora``: PEFT's mixed-batch style. Per modality an index list, ``index_select`` of the
  sub-batch, a Python loop over its adapters, ``index_add`` back.
- ``grouped_mm_lora``: torch's grouped GEMM (``F.grouped_mm`` / ``torch._grouped_mm``): tokens sorted
  by modality (one permuted copy), shrink and expand as one grouped GEMM each over per-modality
  stacked experts (padded to the largest expert count), dense masked router softmax.
- ``naive_kd_kl`` / ``naive_linear_kd_kl``: both logits materialised, float32 log_softmax of each, KL.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_float32(t: Tensor) -> Tensor:
    """Upcast to float32 as the method does for softmaxes, keeping float64 (the tests' dtype)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _modality_experts(experts_per_modality: Sequence[int]) -> list[range]:
    """Expert indices of each modality (experts are ordered by modality)."""
    ranges, start = [], 0
    for count in experts_per_modality:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def _expert_mixture(u_m: Tensor, lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
                    experts: range, scaling: float) -> Tensor:
    """scaling * sum_e g_e B_e A_e u for one modality's gathered tokens, one expert at a time."""
    gates = None
    if len(experts) > 1:
        logits = F.linear(u_m, router_weight[experts.start:experts.stop])
        gates = torch.softmax(_at_least_float32(logits), dim=-1).to(u_m.dtype)
    mixture = 0
    for slot, expert in enumerate(experts):
        out = F.linear(F.linear(u_m, lora_a[expert]), lora_b[expert]) * scaling
        mixture = mixture + (out if gates is None else gates[:, slot:slot + 1] * out)
    return mixture


def naive_mode_lora(x: Tensor, weight: Tensor, bias: Tensor | None, modality: Tensor, lora_a: Tensor,
                    lora_b: Tensor, router_weight: Tensor | None = None, *, experts_per_modality: Sequence[int],
                    scaling: float, lora_input: Tensor | None = None) -> Tensor:
    """MoDE-official-style routed LoRA: boolean-mask gathers and scatter-adds, one expert at a time."""
    u = x if lora_input is None else lora_input
    y = F.linear(x, weight, bias)
    for m, experts in enumerate(_modality_experts(experts_per_modality)):
        is_m = modality == m
        mixture = _expert_mixture(u[is_m], lora_a, lora_b, router_weight, experts, scaling)
        y = y.index_put((is_m,), mixture, accumulate=True)
    return y


def peft_loop_lora(x: Tensor, weight: Tensor, bias: Tensor | None, modality: Tensor, lora_a: Tensor,
                   lora_b: Tensor, router_weight: Tensor | None = None, *, experts_per_modality: Sequence[int],
                   scaling: float, lora_input: Tensor | None = None) -> Tensor:
    """PEFT-mixed-batch-style routed LoRA: per-modality index lists, index_select, adapter loop, index_add."""
    k, n = x.shape[-1], weight.shape[0]
    xs = x.reshape(-1, k)
    us = xs if lora_input is None else lora_input.reshape(-1, k)
    ids = modality.reshape(-1)
    y = F.linear(xs, weight, bias)
    for m, experts in enumerate(_modality_experts(experts_per_modality)):
        rows = torch.nonzero(ids == m).squeeze(1)
        mixture = _expert_mixture(us.index_select(0, rows), lora_a, lora_b, router_weight, experts, scaling)
        y = y.index_add(0, rows, mixture)
    return y.reshape(*x.shape[:-1], n)


# torch's grouped GEMM: public as F.grouped_mm in recent releases, torch._grouped_mm before.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``grouped_mm_lora`` cannot run here, or None when it can."""
    if _grouped_mm is None:
        return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"torch's grouped GEMM needs sm_80+, this GPU is sm_{major}{minor}"
        if dtype != torch.bfloat16:
            return "torch's grouped GEMM on CUDA takes bfloat16 only"
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch's grouped GEMM takes float32/bfloat16/float16, not {dtype}"
    return None


def grouped_mm_lora(x: Tensor, weight: Tensor, bias: Tensor | None, modality: Tensor, lora_a: Tensor,
                    lora_b: Tensor, router_weight: Tensor | None = None, *, experts_per_modality: Sequence[int],
                    scaling: float, lora_input: Tensor | None = None) -> Tensor:
    """Routed LoRA with torch's grouped GEMM, one group per modality.

    Each modality's experts are stacked side by side ([K, slots * r] and [slots * r, N], slots = the
    largest expert count; a modality with fewer experts gets zero slots), so shrink and expand are one
    grouped GEMM each over the tokens sorted by modality. The grouped GEMM needs row strides that are
    multiples of 16 bytes (K, N and slots * r).
    """
    k, n = x.shape[-1], weight.shape[0]
    num_experts, rank = lora_a.shape[0], lora_a.shape[1]
    experts = _modality_experts(experts_per_modality)
    slots = max(experts_per_modality)
    xs = x.reshape(-1, k)
    us = xs if lora_input is None else lora_input.reshape(-1, k)
    ids = modality.reshape(-1)
    device = x.device

    # slot_expert[m, j]: expert in slot j of modality m, or num_experts (an all-zero padding expert).
    slot_expert = torch.full((len(experts), slots), num_experts, dtype=torch.long, device=device)
    for m, e in enumerate(experts):
        slot_expert[m, :len(e)] = torch.arange(e.start, e.stop, device=device)
    a_padded = torch.cat([lora_a, lora_a.new_zeros(1, rank, k)])[slot_expert]        # [M, slots, r, K]
    b_padded = torch.cat([lora_b, lora_b.new_zeros(1, n, rank)])[slot_expert]        # [M, slots, N, r]
    a_grouped = a_padded.reshape(len(experts), slots * rank, k).transpose(1, 2)       # [M, K, slots*r]
    b_grouped = b_padded.permute(0, 1, 3, 2).reshape(len(experts), slots * rank, n)   # [M, slots*r, N]

    order = torch.argsort(ids, stable=True)
    ids_sorted = ids[order]
    group_ends = torch.cumsum(torch.bincount(ids, minlength=len(experts)), 0).to(torch.int32)
    u_sorted = us[order]
    h = _grouped_mm(u_sorted, a_grouped, offs=group_ends)                             # [T, slots*r]

    token_slots = slot_expert[ids_sorted]                                             # [T, slots]
    if router_weight is None:
        slot_gates = (token_slots < num_experts).to(h.dtype)
    else:
        owner = torch.repeat_interleave(torch.arange(len(experts), device=device),
                                        torch.tensor(list(experts_per_modality), device=device))
        logits = _at_least_float32(F.linear(u_sorted, router_weight))
        logits = logits.masked_fill(owner.unsqueeze(0) != ids_sorted.unsqueeze(1), float("-inf"))
        gates = torch.softmax(logits, dim=-1)
        slot_gates = torch.cat([gates, gates.new_zeros(gates.shape[0], 1)], 1).gather(1, token_slots).to(h.dtype)
    h = (h.view(-1, slots, rank) * (slot_gates * scaling).unsqueeze(-1)).reshape(-1, slots * rank)
    lora_sorted = _grouped_mm(h, b_grouped, offs=group_ends)                          # [T, N]
    y = F.linear(xs, weight, bias).index_add(0, order, lora_sorted)
    return y.reshape(*x.shape[:-1], n)


def naive_kd_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                mask: Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                reduction: str = "mean") -> Tensor:
    """T^2 KL(teacher || student) the plain way: float32 log_softmax of both full logits, then KL."""
    if vocab_range is not None:
        lo, hi = vocab_range
        student_logits, teacher_logits = student_logits[..., lo:hi], teacher_logits[..., lo:hi]
    log_ps = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    log_pt = F.log_softmax(_at_least_float32(teacher_logits.detach()) / temperature, dim=-1)
    per_position = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1) * temperature ** 2
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    count = per_position.numel() if mask is None else mask.sum().clamp(min=1)
    return per_position.sum() / count


def naive_linear_kd_kl(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, *,
                       teacher_weight: Tensor | None = None, **kd_options) -> Tensor:
    """``naive_kd_kl`` on the logits of both output projections, materialised in full."""
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, weight if teacher_weight is None else teacher_weight)
    return naive_kd_kl(F.linear(student_hidden, weight), teacher_logits, **kd_options)


def naive_linear_kd_kl_topk(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, *, topk: int,
                            temperature: float = 1.0) -> Tensor:
    """The top-k loss the plain way: both full logits, the teacher's top k by torch.topk, the student's gathered
    there, both renormalised on them (float32 log_softmax), mean over positions."""
    with torch.no_grad():
        teacher_logits, index = F.linear(teacher_hidden, weight).topk(topk, dim=-1)
    student_logits = F.linear(student_hidden, weight).gather(-1, index)
    return naive_kd_kl(student_logits, teacher_logits, temperature=temperature)
