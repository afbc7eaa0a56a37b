"""modality_lora_linear on the torch backend: values, gradients, edge cases, dtypes."""
import pytest
import torch
from naive import routed_lora as naive_routed_lora

import mode_kernels as mk

F64 = torch.float64


def make_inputs(lead, k, n, r, epm, dtype=F64, bias=True, router=True, seed=0, modality=None):
    g = torch.Generator().manual_seed(seed)
    e = sum(epm)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    if modality is None:
        modality = torch.randint(0, len(epm), lead, generator=g)
    return dict(
        x=rnd(*lead, k), weight=rnd(n, k, scale=k ** -0.5), bias=rnd(n) if bias else None, modality=modality,
        lora_a=rnd(e, r, k, scale=k ** -0.5), lora_b=rnd(e, n, r, scale=r ** -0.5),
        router_weight=rnd(e, k) if router else None)


def call(inp, epm, scaling=2.0, lora_input=None, backend="torch"):
    return mk.modality_lora_linear(inp["x"], inp["weight"], inp["bias"], inp["modality"], inp["lora_a"],
                                   inp["lora_b"], inp["router_weight"], experts_per_modality=epm, scaling=scaling,
                                   lora_input=lora_input, backend=backend)


def gold(inp, epm, scaling=2.0, lora_input=None):
    as64 = {k: (v.to(F64) if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    return naive_routed_lora(as64["x"], as64["weight"], as64["bias"], as64["modality"], as64["lora_a"],
                             as64["lora_b"], as64["router_weight"], epm, scaling,
                             None if lora_input is None else lora_input.to(F64))


@pytest.mark.parametrize("epm", [(4, 1), (1, 1), (2, 3, 1), (1,), (3,)])
@pytest.mark.parametrize("lead,k,n,r", [((37,), 19, 23, 4), ((2, 29), 33, 17, 8), ((1,), 5, 3, 2)])
def test_forward_matches_naive(epm, lead, k, n, r):
    inp = make_inputs(lead, k, n, r, epm)
    y = call(inp, epm)
    assert y.shape == (*lead, n) and y.dtype == F64
    torch.testing.assert_close(y, gold(inp, epm), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["all_text", "all_image", "absent", "one_token", "zero_tokens"])
def test_edge_cases(case):
    epm = (4, 1)
    lead = {"one_token": (1,), "zero_tokens": (0,)}.get(case, (3, 21))
    ids = {"all_text": torch.zeros(lead, dtype=torch.long), "all_image": torch.ones(lead, dtype=torch.long),
           "absent": torch.ones(lead, dtype=torch.long)}.get(case)
    inp = make_inputs(lead, 13, 11, 4, epm, modality=ids)
    for t in ("x", "weight", "bias", "lora_a", "lora_b", "router_weight"):
        inp[t].requires_grad_(True)
    y = call(inp, epm)
    torch.testing.assert_close(y, gold(inp, epm), rtol=1e-12, atol=1e-12)
    (y * torch.randn_like(y)).sum().backward()
    assert inp["lora_b"].grad.shape == inp["lora_b"].shape
    if case == "all_image" or case == "absent":  # text experts and router untouched by image-only batches
        assert inp["lora_b"].grad[:4].abs().max() == 0 and inp["router_weight"].grad.abs().max() == 0
        assert inp["lora_b"].grad[4].abs().max() > 0
    if case == "zero_tokens":
        assert y.shape == (0, 11) and inp["lora_a"].grad.abs().max() == 0


def test_gradcheck_all_inputs():
    epm = (2, 3, 1)
    inp = make_inputs((2, 9), 7, 5, 3, epm, seed=1)
    u = torch.randn(2, 9, 7, dtype=F64, requires_grad=True)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "router_weight"]
    for name in names:
        inp[name].requires_grad_(True)

    def f(x, weight, bias, lora_a, lora_b, router_weight, lora_input):
        d = dict(inp, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, router_weight=router_weight)
        return call(d, epm, scaling=1.5, lora_input=lora_input)

    assert torch.autograd.gradcheck(f, [inp[n] for n in names] + [u], fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, a, b, rw: f(x, inp["weight"], inp["bias"], a, b, rw, None),
                                    [inp["x"], inp["lora_a"], inp["lora_b"], inp["router_weight"]], fast_mode=True)


def test_gradients_match_naive_autograd():
    epm = (4, 1)
    inp = make_inputs((3, 17), 21, 13, 8, epm, seed=2)
    u = torch.randn(3, 17, 21, dtype=F64)
    grads = {}
    for which in ("ours", "naive"):
        leaves = {k: v.detach().clone().requires_grad_(True)
                  for k, v in inp.items() if k != "modality" and v is not None}
        uu = u.clone().requires_grad_(True)
        d = dict(inp, **leaves)
        y = call(d, epm, lora_input=uu) if which == "ours" else gold(d, epm, lora_input=uu)
        y.pow(2).sum().backward()
        grads[which] = {k: v.grad for k, v in leaves.items()} | {"lora_input": uu.grad}
    for k in grads["naive"]:
        torch.testing.assert_close(grads["ours"][k], grads["naive"][k], rtol=1e-10, atol=1e-10, msg=k)


def test_non_contiguous_x_and_plan_reuse():
    epm = (4, 1)
    inp = make_inputs((4, 30), 16, 12, 4, epm, seed=3)
    x_t = torch.randn(16, 30, 4, dtype=F64).permute(2, 1, 0)  # [4, 30, 16], non-contiguous
    assert not x_t.is_contiguous()
    inp["x"] = x_t
    plan = mk.plan_routing(inp["modality"], 2)
    y_plan = call(dict(inp, modality=plan), epm)
    torch.testing.assert_close(y_plan, gold(inp, epm), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_plan, call(inp, epm))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float32, 1e-5)])
def test_low_precision_no_worse_than_naive_same_dtype(dtype, tol):
    epm = (4, 1)
    inp = make_inputs((2, 40), 48, 40, 8, epm, dtype=dtype, seed=4)
    ref = gold(inp, epm)
    ours = call(inp, epm)
    assert ours.dtype == dtype
    low = {k: v for k, v in inp.items()}
    naive_same = naive_routed_lora(low["x"], low["weight"], low["bias"], low["modality"], low["lora_a"],
                                   low["lora_b"], low["router_weight"], epm, 2.0)
    err_ours = (ours.to(F64) - ref).abs().max()
    err_naive = (naive_same.to(F64) - ref).abs().max()
    assert err_ours <= err_naive + tol, (err_ours, err_naive)


LAYOUT_RANKS = [(epm, 8) for epm in [(4, 1), (2, 1), (3, 1), (8, 1), (16,), (1, 1), (2, 2)]] + \
    [((4, 1), r) for r in (4, 6, 16, 32, 64)]


@pytest.mark.parametrize("epm,r", LAYOUT_RANKS, ids=[f"{'_'.join(map(str, e))}_r{r}" for e, r in LAYOUT_RANKS])
def test_values_and_every_gradient_match_naive_float64(epm, r):
    """Every layout at rank 8 and every rank at (4, 1): y and all seven gradients against autograd on the
    naive dense formula, float64, with a separate adapter input and random modality ids."""
    inp = make_inputs((23,), 17, 19, r, epm)
    u = torch.randn(23, 17, dtype=F64, generator=torch.Generator().manual_seed(5))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if k != "modality" and v is not None}
    ours_in = {**inp, **leaves}
    u_ours = u.clone().requires_grad_()
    y = call(ours_in, epm, lora_input=u_ours)
    dy = torch.randn_like(y)
    y.backward(dy)
    gold_leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    u_gold = u.clone().requires_grad_()
    y_gold = naive_routed_lora(gold_leaves["x"], gold_leaves["weight"], gold_leaves["bias"], inp["modality"],
                               gold_leaves["lora_a"], gold_leaves["lora_b"], gold_leaves.get("router_weight"), epm,
                               2.0, u_gold)
    y_gold.backward(dy)
    torch.testing.assert_close(y, y_gold, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u_ours.grad, u_gold.grad, rtol=1e-10, atol=1e-10)
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, gold_leaves[name].grad, rtol=1e-10, atol=1e-10, msg=name)
