"""Reference (pure PyTorch) modality-routed LoRA: the CPU path and the test oracle.

Each modality's tokens are gathered once, run through that modality's experts only, and
added back with one ``index_add_``. Math is in float32 (float64 for float64 inputs).
The backward is written out by hand (checked against autograd and finite differences).
"""
from __future__ import annotations

import torch

from ..contract import RoutedLoraGrads, RoutedLoraNeeds, RoutedLoraOptions, RoutedLoraSaved
from ..routing import RoutingPlan


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expert_ranges(experts_per_modality):
    start = 0
    for n in experts_per_modality:
        yield start, start + n
        start += n


def saved_like(x, lora_a, router_weight, options: RoutedLoraOptions) -> RoutedLoraSaved:
    """The reference saves nothing: its backward recomputes."""
    return RoutedLoraSaved.nothing(x)


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        options: RoutedLoraOptions) -> tuple[torch.Tensor, RoutedLoraSaved]:
    """y = x W^T + b + scaling * sum_e g_e (u A_e^T) B_e^T for each token's own modality.

    x, lora_input (u; None means x): [T, K]. Returns (y [T, N] in x's dtype, nothing saved).
    """
    experts_per_modality, scaling = options.experts_per_modality, options.scaling
    acc = _acc_dtype(x)
    u = x if lora_input is None else lora_input
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    offsets = plan.offsets.tolist()
    num_out, rank = lora_b.shape[1], lora_b.shape[2]
    for m, (e0, e1) in enumerate(_expert_ranges(experts_per_modality)):
        idx = plan.order[offsets[m]:offsets[m + 1]]
        if idx.numel() == 0:
            continue
        um = u.index_select(0, idx).to(acc)
        n_exp = e1 - e0
        h = (um @ lora_a[e0:e1].reshape(n_exp * rank, -1).to(acc).t()).view(-1, n_exp, rank)
        if n_exp > 1:
            gates = torch.softmax(um @ router_weight[e0:e1].to(acc).t(), dim=-1)
            h = h * gates.unsqueeze(-1)
        b_m = lora_b[e0:e1].permute(1, 0, 2).reshape(num_out, n_exp * rank).to(acc)
        y = y.index_add(0, idx, (h.reshape(-1, n_exp * rank) * scaling) @ b_m.t())
    return y.to(x.dtype), RoutedLoraSaved.nothing(x)


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                         options: RoutedLoraOptions, needs: RoutedLoraNeeds,
                         saved: RoutedLoraSaved | None = None) -> RoutedLoraGrads:
    """The gradients in ``needs`` (None elsewhere); ``saved`` is unused (nothing is saved).
    With lora_input None the adapters' input gradient is part of dx.
    """
    experts_per_modality, scaling = options.experts_per_modality, options.scaling
    need_x, need_u, need_w, need_bias, need_a, need_b, need_r = needs
    acc = _acc_dtype(x)
    u = (x if lora_input is None else lora_input).to(acc)
    dy = grad_y.to(acc)
    num_experts, rank = lora_a.shape[0], lora_a.shape[1]
    num_out = lora_b.shape[1]
    du = torch.zeros_like(u) if need_x or need_u else None
    da = torch.zeros(lora_a.shape, dtype=acc, device=x.device) if need_a else None
    db = torch.zeros(lora_b.shape, dtype=acc, device=x.device) if need_b else None
    dr = torch.zeros(num_experts, u.shape[1], dtype=acc, device=x.device) if need_r else None
    offsets = plan.offsets.tolist()
    for m, (e0, e1) in enumerate(_expert_ranges(experts_per_modality)):
        idx = plan.order[offsets[m]:offsets[m + 1]]
        if idx.numel() == 0:
            continue
        n_exp = e1 - e0
        um, dym = u.index_select(0, idx), dy.index_select(0, idx)
        a_m = lora_a[e0:e1].reshape(n_exp * rank, -1).to(acc)
        b_m = lora_b[e0:e1].permute(1, 0, 2).reshape(num_out, n_exp * rank).to(acc)
        h = (um @ a_m.t()).view(-1, n_exp, rank)
        if n_exp > 1:
            gates = torch.softmax(um @ router_weight[e0:e1].to(acc).t(), dim=-1)
        else:
            gates = torch.ones_like(h[..., 0])
        d_hg = (dym @ b_m).view(-1, n_exp, rank)                 # d(gated, scaled h)
        dh = d_hg * gates.unsqueeze(-1) * scaling
        if need_b:
            hg = (h * gates.unsqueeze(-1) * scaling).reshape(-1, n_exp * rank)
            db[e0:e1] = (dym.t() @ hg).view(num_out, n_exp, rank).permute(1, 0, 2)
        if need_a:
            da[e0:e1] = torch.einsum("ter,tk->erk", dh, um)
        du_m = dh.reshape(-1, n_exp * rank) @ a_m if du is not None else None
        if n_exp > 1:
            d_gates = (d_hg * h).sum(-1) * scaling
            d_logits = gates * (d_gates - (gates * d_gates).sum(-1, keepdim=True))
            if need_r:
                dr[e0:e1] = d_logits.t() @ um
            if du is not None:
                du_m = du_m + d_logits @ router_weight[e0:e1].to(acc)
        if du is not None:
            du.index_add_(0, idx, du_m)
    dx = du_in = None
    if need_x:
        dx = dy @ weight.to(acc)
        if lora_input is None:
            dx = dx + du
        dx = dx.to(x.dtype)
    if need_u:
        du_in = du.to(lora_input.dtype)
    dw = (dy.t() @ x.to(acc)).to(weight.dtype) if need_w else None
    dbias = dy.sum(0).to(bias.dtype) if need_bias else None
    return RoutedLoraGrads(x=dx, lora_input=du_in, weight=dw, bias=dbias,
                           lora_a=None if da is None else da.to(lora_a.dtype),
                           lora_b=None if db is None else db.to(lora_b.dtype),
                           router_weight=None if dr is None else dr.to(router_weight.dtype))
