"""Reference (pure PyTorch) modality-routed LoRA: the CPU path and the test oracle.

Each modality's tokens are gathered once, run through that modality's experts only, and
added back with one ``index_add_``. Math is in float32 (float64 for float64 inputs).
The backward recomputes the forward under autograd: exact by construction.
"""
from __future__ import annotations

import torch

from ..routing import RoutingPlan


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expert_ranges(experts_per_modality):
    start = 0
    for n in experts_per_modality:
        yield start, start + n
        start += n


def routed_lora_forward(x, weight, bias, lora_input, plan: RoutingPlan, lora_a, lora_b, router_weight,
                        experts_per_modality, scaling):
    """y = x W^T + b + scaling * sum_e g_e (u A_e^T) B_e^T for each token's own modality.

    x, lora_input (u; None means x): [T, K]. Returns y [T, N] in x's dtype.
    """
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
    return y.to(x.dtype)


def routed_lora_backward(grad_y, x, weight, bias, lora_input, plan, lora_a, lora_b, router_weight,
                         experts_per_modality, scaling, needs):
    """Gradients (dx, d lora_input, d weight, d bias, d lora_a, d lora_b, d router_weight).

    ``needs`` is a sequence of 7 bools in that order; unneeded entries come back as None.
    """
    leaves = [x, lora_input, weight, bias, lora_a, lora_b, router_weight]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(bool(n)) if t is not None else None for t, n in zip(leaves, needs)]
        y = routed_lora_forward(inputs[0], inputs[2], inputs[3], inputs[1], plan, inputs[4], inputs[5],
                                inputs[6], experts_per_modality, scaling)
        wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, allow_unused=True)
    out = [None] * 7
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(leaves[i]) if g is None else g
    return tuple(out)
