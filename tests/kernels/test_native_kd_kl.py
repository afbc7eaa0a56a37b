"""Native CPU KD loss (logits form and fused-linear form, forward and gradients) against the float64 gold.

float64 runs the same code in float64 and must match the naive dense formula to 1e-10 (relative);
bf16/fp16 must be no further from the gold than the naive formula in the same dtype, plus tol.
"""
import os

import pytest
import torch
from naive import kd_kl as naive_kd

import mode_kernels as mk
from mode_kernels import native
from mode_kernels.contract import KdOptions
from mode_kernels.native import kd_kl as nat

if os.environ.get("MODE_KERNELS_NATIVE") == "0":
    pytest.skip("MODE_KERNELS_NATIVE=0 switches the native backend off", allow_module_level=True)
native.extension()  # a failed build fails these tests, with the compiler's reason

F64 = torch.float64
LOW_PRECISION_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def rnd(*shape, seed, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def close(ours, gold, rel=1e-10):
    assert ours.shape == gold.shape
    if gold.numel():
        err = (ours.double() - gold.double()).abs().max().item()
        assert err <= rel * max(gold.abs().max().item(), 1.0), err


def masked_teacher(t, dtype_min):
    """Some entries masked (-inf or the dtype's most negative value), a row with one live entry, a dead row."""
    t = t.clone()
    t[0, 5:] = dtype_min
    t[1, :] = float("-inf")
    t[1, 3] = 1.0
    t[2, :] = dtype_min
    return t


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("rows,vocab,vocab_range", [(7, 1, None), (37, 19, None), (9, 1000, (3, 997)), (0, 8, None)])
def test_logits_form_matches_gold(temperature, rows, vocab, vocab_range):
    s = rnd(rows, vocab, seed=0, scale=3.0).requires_grad_()
    t = rnd(rows, vocab, seed=1, scale=3.0)
    if rows >= 3 and vocab >= 8:
        t = masked_teacher(t, torch.finfo(F64).min)
    mask = rnd(rows, seed=2) > -0.5
    kw = dict(temperature=temperature, mask=mask, vocab_range=vocab_range, reduction="none")
    ours = mk.kd_kl_loss(s, t, backend="native", **kw)
    gold = naive_kd(s, t, **kw)
    close(ours, gold)
    weights = rnd(rows, seed=3)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), s)
    (g_gold,) = torch.autograd.grad((gold * weights).sum(), s)
    close(g_ours, g_gold.nan_to_num(nan=0.0))  # the gold's dead row (no live teacher logit) has NaN gradients
    assert torch.isfinite(g_ours).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_form_masked_teacher_in_each_dtype(dtype):
    s = rnd(4, 33, seed=5, dtype=dtype).requires_grad_()
    t = masked_teacher(rnd(4, 33, seed=6, dtype=dtype), torch.finfo(dtype).min)
    ours = mk.kd_kl_loss(s, t, reduction="none", backend="native")
    gold = naive_kd(s.detach().double(), t.double().masked_fill(t <= torch.finfo(dtype).min, float("-inf")),
                    reduction="none")
    torch.testing.assert_close(ours.double(), gold, rtol=1e-5, atol=1e-5)
    assert ours[2] == 0
    ours.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[2].abs().max() == 0


def fused_case(rows, hidden, vocab, seed, dtype=F64):
    return (rnd(rows, hidden, seed=seed, dtype=dtype), rnd(rows, hidden, seed=seed + 1, dtype=dtype),
            rnd(vocab, hidden, seed=seed + 2, scale=0.5, dtype=dtype),
            rnd(vocab, hidden, seed=seed + 3, scale=0.5, dtype=dtype))


@pytest.mark.parametrize("separate_teacher", [False, True])
@pytest.mark.parametrize("rows,vocab_range,topk", [(300, (3, 45), None), (37, None, None), (300, (2, 47), 7),
                                                    (1, None, 50), (0, None, None)])
def test_fused_linear_matches_gold(separate_teacher, rows, vocab_range, topk):
    """300 rows: several chunks of positions and a shorter last one."""
    hs, ht, w, wt = fused_case(rows, 13, 50, seed=7)
    tw = wt if separate_teacher else None
    mask = rnd(rows, seed=8) > -0.5
    if rows > 5:
        ht[4] = 0.0  # equal teacher logits: a uniform teacher row
    lo, hi = vocab_range or (0, 50)
    ours = nat.fused_linear_kd_kl_forward(hs, ht, w, tw, mask, 2.0, lo, hi, topk=topk)
    w_leaf = w.clone().requires_grad_()
    hs_leaf = hs.clone().requires_grad_()
    gold = naive_kd(hs_leaf @ w_leaf.t(), ht @ (w if tw is None else tw).t(), 2.0, mask=mask,
                    vocab_range=vocab_range, topk=topk, reduction="none")
    close(ours[0], gold)
    weights = rnd(rows, seed=9)
    g_hs, g_w = torch.autograd.grad((gold * weights).sum(), [hs_leaf, w_leaf])
    d_hs, d_w = nat.fused_linear_kd_kl_backward(weights, hs, ht, w, tw, mask, ours[1], ours[2], 2.0, lo, hi, True,
                                                topk=topk)
    close(d_hs, g_hs)
    close(d_w, g_w)
    # gradients in the forward (for per-row output gradients known up front) equal the backward's
    *fwd, d_hs_fwd = nat.fused_linear_kd_kl_forward(hs, ht, w, tw, mask, 2.0, lo, hi, topk=topk, grad_rows=weights)
    close(d_hs_fwd, g_hs)
    for a, b in zip(fwd, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_linear_masked_teacher_weight_rows():
    """A teacher logit of -inf in every position (a vocab entry the teacher never predicts) counts 0."""
    hs, ht, w, _ = fused_case(20, 8, 30, seed=10)
    wt = w.clone()
    wt[5] = 0.0
    ht = ht.clone()
    ours = nat.fused_linear_kd_kl_forward(hs, ht, w, wt, None, 1.0, 0, 30)[0]
    gold = naive_kd(hs @ w.t(), ht @ wt.t(), 1.0, reduction="none")
    close(ours, gold)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive_same_dtype(dtype):
    tol = LOW_PRECISION_TOL[dtype]
    s64, t64 = rnd(64, 300, seed=16, scale=3.0), rnd(64, 300, seed=17, scale=3.0)
    s, t = s64.to(dtype).requires_grad_(), t64.to(dtype)
    gold_s = s.detach().to(F64).requires_grad_()
    gold = naive_kd(gold_s, t.to(F64), 2.0)
    (g_gold,) = torch.autograd.grad(gold, gold_s)
    ours = mk.kd_kl_loss(s, t, temperature=2.0, backend="native")
    (g_ours,) = torch.autograd.grad(ours, s)
    s_naive = s.detach().clone().requires_grad_()
    naive_same = naive_kd(s_naive, t, 2.0)
    (g_naive,) = torch.autograd.grad(naive_same, s_naive)
    assert abs(ours.double() - gold) <= abs(naive_same.double() - gold) + tol
    assert (g_ours.double() - g_gold).abs().max() <= (g_naive.double() - g_gold).abs().max() + tol

    hs, ht, w, _ = (x.to(dtype) for x in fused_case(96, 24, 200, seed=18))
    hs.requires_grad_()
    gold_hs = hs.detach().double().requires_grad_()
    gold = naive_kd(gold_hs @ w.double().t(), ht.double() @ w.double().t(), 2.0)
    (g_gold,) = torch.autograd.grad(gold, gold_hs)
    ours = mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0, backend="native")
    (g_ours,) = torch.autograd.grad(ours, hs)
    hs_naive = hs.detach().clone().requires_grad_()
    naive_same = naive_kd(hs_naive @ w.t(), ht @ w.t(), 2.0)
    (g_naive,) = torch.autograd.grad(naive_same, hs_naive)
    assert g_ours.dtype == dtype
    assert abs(ours.double() - gold) <= abs(naive_same.double() - gold) + tol
    assert (g_ours.double() - g_gold).abs().max() <= (g_naive.double() - g_gold).abs().max() + tol


@pytest.mark.parametrize("separate_teacher", [False, True])
@pytest.mark.parametrize("topk", [None, 40])
def test_fused_linear_results_do_not_depend_on_how_positions_are_split(separate_teacher, topk):
    """Data-parallel runs give each process a part of the positions, so each part has its own chunks: a
    position's loss and d hs must come out bit for bit as in one call with all positions (every column of a
    chunk gets the same vector arithmetic, and GEMMs never run on fewer than 16 positions, whose kernels round
    differently). The parts cut chunks at odd places and leave parts of 1 and 2 positions. (This also relies
    on the BLAS computing each output of a GEMM of 16 or more columns the same way whatever their number, as
    the MKL of torch's x86 wheels does.)"""
    hs, ht, w, wt = (x.float() for x in fused_case(250, 32, 1100, seed=22))
    tw = wt if separate_teacher else None
    mask = rnd(250, seed=23) > -0.5
    grad_rows = rnd(250, seed=24).float()
    args = (2.0, 4, 1030)

    def run(a, b):
        loss, lse_s, lse_t, d_hs = nat.fused_linear_kd_kl_forward(hs[a:b], ht[a:b], w, tw, mask[a:b], *args,
                                                                  topk=topk, grad_rows=grad_rows[a:b])
        d_hs_bwd, _ = nat.fused_linear_kd_kl_backward(grad_rows[a:b], hs[a:b], ht[a:b], w, tw, mask[a:b], lse_s,
                                                      lse_t, *args, False, topk=topk)
        return loss, d_hs, d_hs_bwd

    whole = run(0, 250)
    for cut in (1, 2, 17, 125, 249):
        parts = [run(0, cut), run(cut, 250)]
        for ours, full in zip(zip(*parts), whole):
            assert torch.equal(torch.cat(ours), full), cut


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_result(threads):
    hs, ht, w, _ = (x.float() for x in fused_case(200, 16, 300, seed=20))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = nat.fused_linear_kd_kl_forward(hs, ht, w, None, None, 2.0, 0, 300, grad_rows=torch.ones(200))
        logits = nat.kd_kl_forward(hs @ w.t(), ht @ w.t(), None, KdOptions(2.0, 0, 300))
    finally:
        torch.set_num_threads(before)
    gold = naive_kd(hs.double() @ w.double().t(), ht.double() @ w.double().t(), 2.0, reduction="none")
    torch.testing.assert_close(ours[0].double(), gold, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0].double(), gold, rtol=1e-4, atol=1e-5)


def test_public_api_native_backend_is_selectable_and_auto_picks_it():
    cpu = torch.device("cpu")
    for op in ("kd_kl", "fused_linear_kd_kl"):
        assert mk.backends.resolve("native", cpu, op) == "native"
        assert mk.backends.resolve("auto", cpu, op) == "native"
    hs, ht, w, _ = fused_case(30, 8, 40, seed=21)
    native_loss = mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0, backend="native")
    torch.testing.assert_close(native_loss, mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0, backend="torch"),
                               rtol=1e-10, atol=1e-12)
