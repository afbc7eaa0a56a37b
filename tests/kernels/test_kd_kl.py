"""kd_kl_loss and fused_linear_kd_kl_loss on the torch backend against naive dense formulas."""
import pytest
import torch
from naive import fused_linear_kd_kl as naive_fused
from naive import kd_kl as naive_kd

import mode_kernels as mk
from mode_kernels import kd_memory
from mode_kernels.reference import kd_kl as reference_kd

F64 = torch.float64


def logits(shape, seed, scale=3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [1, 17, 1000])
def test_kd_matches_naive(temperature, reduction, v):
    s, t = logits((3, 7, v), 0), logits((3, 7, v), 1)
    mask = logits((3, 7), 2) > 0
    out = mk.kd_kl_loss(s, t, temperature=temperature, mask=mask, reduction=reduction)
    gold = naive_kd(s, t, temperature, mask=mask, reduction=reduction)
    assert out.shape == gold.shape
    torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vocab_range,topk", [((3, 40), None), (None, 5), ((10, 50), 7), ((0, 64), 64)])
def test_kd_vocab_range_and_topk(vocab_range, topk):
    s, t = logits((2, 5, 64), 3), logits((2, 5, 64), 4)
    s.requires_grad_(True)
    out = mk.kd_kl_loss(s, t, temperature=2.0, vocab_range=vocab_range, topk=topk)
    gold = naive_kd(s, t, 2.0, vocab_range=vocab_range, topk=topk)
    torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(out * 2, s)  # grad_output != 1
    (g_gold,) = torch.autograd.grad(gold * 2, s)
    torch.testing.assert_close(g_ours, g_gold, rtol=1e-10, atol=1e-12)
    if vocab_range is not None and vocab_range != (0, 64):
        outside = torch.ones(64, dtype=torch.bool)
        outside[vocab_range[0]:vocab_range[1]] = False
        assert g_ours[..., outside].abs().max() == 0


@pytest.mark.parametrize("dtype,masked", [(F64, float("-inf")), (torch.float32, torch.finfo(torch.float32).min),
                                          (F64, torch.finfo(F64).min),
                                          (torch.bfloat16, torch.finfo(torch.bfloat16).min)])
def test_kd_masked_teacher_logits(dtype, masked):
    s, t = logits((4, 33), 5, dtype=dtype), logits((4, 33), 6, dtype=dtype)
    t[0, 5:] = masked              # some entries masked
    t[1, :] = masked
    t[1, 7] = 1.0                  # every teacher logit but one masked
    t[2, :] = masked               # nothing left: the row counts 0
    s.requires_grad_(True)
    out = mk.kd_kl_loss(s, t, reduction="none")
    assert torch.isfinite(out).all()
    gold = naive_kd(s.detach().double(), t.double().masked_fill(t <= torch.finfo(t.dtype).min, float("-inf")),
                    reduction="none")
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    assert out[2] == 0
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[2].abs().max() == 0
    # a one-hot teacher: KL = -T^2 log p_s(the one entry)
    torch.testing.assert_close(out[1].double(), -torch.log_softmax(s[1].detach().double(), -1)[7], rtol=1e-5, atol=1e-5)


def test_kd_mask_edge_cases():
    # huge masked rows stay finite
    s, t = logits((3, 9), 7, 500.0, torch.float32), logits((3, 9), 8, 3.0, torch.float32)
    s.requires_grad_(True)
    mk.kd_kl_loss(s, t, mask=torch.tensor([True, False, False])).backward()
    assert torch.isfinite(s.grad).all() and s.grad[1:].abs().max() == 0 and s.grad[0].abs().max() > 0
    s = s.detach()
    none = torch.zeros(3, dtype=torch.bool)
    assert mk.kd_kl_loss(s, t, mask=none).item() == 0.0
    assert mk.kd_kl_loss(s[:0], t[:0]).item() == 0.0
    per = mk.kd_kl_loss(s, t, mask=torch.tensor([True, False, True]), reduction="none")
    assert per[1] == 0 and per[0] > 0


def test_kd_student_only_gradient_and_gradcheck():
    s = logits((2, 3, 11), 9).requires_grad_(True)
    t = logits((2, 3, 11), 10).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda s: mk.kd_kl_loss(s, t, temperature=2.0, mask=mask, vocab_range=(1, 10), topk=6), [s])
    mk.kd_kl_loss(s, t).backward()
    assert t.grad is None


def _fused_case(seed, p=(2, 6), h=13, v=37, dtype=F64):
    hs, ht = logits((*p, h), seed, 1.0, dtype), logits((*p, h), seed + 1, 1.0, dtype)
    w, wt = logits((v, h), seed + 2, 0.5, dtype), logits((v, h), seed + 3, 0.5, dtype)
    return hs, ht, w, wt


@pytest.mark.parametrize("separate_teacher", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("topk", [None, 1, 9, 27])
def test_fused_linear_values_and_gradients_match_naive(separate_teacher, reduction, topk):
    hs, ht, w, wt = _fused_case(11)
    hs.requires_grad_(True), w.requires_grad_(True)
    mask = logits((2, 6), 12) > -0.5
    kw = dict(temperature=2.0, mask=mask, vocab_range=(3, 30), topk=topk, reduction=reduction)
    tw = wt if separate_teacher else None
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, teacher_weight=tw, **kw)
    gold = naive_fused(hs, ht, w, tw, **kw)
    torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)
    grad_out = logits(out.shape, 19) if out.dim() else torch.tensor(-2.5, dtype=F64)  # grad_output != 1
    ours = torch.autograd.grad(out, [hs, w], grad_out)
    want = torch.autograd.grad(gold, [hs, w], grad_out)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ours[1][:3].abs().max() == 0 and ours[1][30:].abs().max() == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_frozen_weight_and_no_grad(reduction):
    hs, ht, w, _ = _fused_case(21, p=(7,), h=5, v=23)
    hs.requires_grad_(True)
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=0.5, topk=4, reduction=reduction)
    (g,) = torch.autograd.grad(out.sum(), hs)
    hs2 = hs.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(naive_fused(hs2, ht, w, temperature=0.5, topk=4, reduction=reduction).sum(), hs2)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=0.5, topk=4, reduction=reduction),
                                   out.detach(), rtol=1e-12, atol=1e-12)


def test_fused_linear_masked_teacher_logits():
    """Teacher logits of -inf and of about the float64 minimum (teacher weights of -inf / -1e307
    against positive hidden states) have probability 0 and count 0; with top-k too."""
    hs, ht, w, wt = _fused_case(23, p=(9,), h=6, v=31)
    ht = ht.abs() + 0.5
    wt[[2, 5], 0] = float("-inf")
    wt[[7, 8, 20], 0] = -1e307
    hs.requires_grad_(True)
    for topk in (None, 10):
        out = mk.fused_linear_kd_kl_loss(hs, ht, w, teacher_weight=wt, topk=topk, reduction="none")
        assert torch.isfinite(out).all()
        gold = naive_fused(hs, ht, w, wt, topk=topk, reduction="none")
        torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(out.sum(), hs)
        (want,) = torch.autograd.grad(gold.sum(), hs)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def test_fused_linear_gradcheck_and_teacher_constant():
    hs, ht, w, wt = _fused_case(13, p=(5,), h=6, v=9)
    hs.requires_grad_(True), w.requires_grad_(True)
    mask = torch.tensor([True, True, False, True, True])
    for reduction, topk in (("mean", None), ("none", 4), ("sum", 3)):
        assert torch.autograd.gradcheck(lambda hs, w, topk=topk, reduction=reduction: mk.fused_linear_kd_kl_loss(
            hs, ht, w, teacher_weight=wt, temperature=0.5, mask=mask, vocab_range=(1, 8), topk=topk,
            reduction=reduction), [hs, w])
    # with a shared weight the teacher's logits are constants: gradient of the student path only
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0)
    g_hs, g_w = torch.autograd.grad(out, [hs, w])
    w2 = w.detach().clone().requires_grad_(True)
    hs2 = hs.detach().clone().requires_grad_(True)
    ref = naive_kd(hs2 @ w2.t(), (ht @ w.t()).detach(), 2.0)
    r_hs, r_w = torch.autograd.grad(ref, [hs2, w2])
    torch.testing.assert_close(g_hs, r_hs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, r_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("topk", [None, 6])
def test_fused_linear_reference_chunks_follow_the_memory_bound(monkeypatch, topk):
    """The reference holds one chunk of logits at a time, sized by kd_memory: the chunks take
    about a tenth of the positions (the bound applied to this small shape as to one of 2^24
    logits and more), and more chunks give the same values and gradients."""
    monkeypatch.setattr(kd_memory, "BOUNDED_FROM_LOGITS", 0)
    hs, ht, w, _ = _fused_case(15, p=(400,), h=8, v=50)
    hs.requires_grad_(True)
    seen = []
    real = reference_kd._fused_chunk
    monkeypatch.setattr(reference_kd, "_fused_chunk", lambda s, *a: seen.append(s.shape[0]) or real(s, *a))
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=topk, backend="torch")
    (g,) = torch.autograd.grad(out, hs)
    assert 35 <= max(seen) <= 55 and sum(seen) == 400, seen
    naive_bytes = 400 * 50 * kd_memory.naive_bytes_per_logit(F64)
    assert max(seen) * reference_kd.fused_bytes_per_row(50, topk, F64) <= naive_bytes / 10
    monkeypatch.setattr(kd_memory, "EXTRA_MEMORY_FRACTION", 0.001)
    seen.clear()
    out2 = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=topk, backend="torch")
    (g2,) = torch.autograd.grad(out2, hs)
    assert max(seen) == 1 and len(seen) == 400
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g2, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("topk", [0, -1, 28, 2.0, True])
def test_bad_topk_raises(topk):
    hs, ht, w, _ = _fused_case(17, p=(3,), h=4, v=30)
    with pytest.raises(ValueError, match="topk"):
        mk.fused_linear_kd_kl_loss(hs, ht, w, vocab_range=(3, 30), topk=topk)
    with pytest.raises(ValueError, match="topk"):
        mk.kd_kl_loss(hs @ w.t(), ht @ w.t(), vocab_range=(3, 30), topk=topk)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float32, 5e-4)])
def test_low_precision_no_worse_than_naive_same_dtype(dtype, tol):
    s64, t64 = logits((64, 300), 16), logits((64, 300), 17)
    s, t = s64.to(dtype).requires_grad_(True), t64.to(dtype)
    gold_s = s.detach().to(F64).requires_grad_(True)
    gold = naive_kd(gold_s, t.to(F64), 2.0)
    (g_gold,) = torch.autograd.grad(gold, gold_s)
    ours = mk.kd_kl_loss(s, t, temperature=2.0)
    (g_ours,) = torch.autograd.grad(ours, s)
    s_naive = s.detach().clone().requires_grad_(True)
    naive_same = naive_kd(s_naive, t, 2.0)
    (g_naive,) = torch.autograd.grad(naive_same, s_naive)
    assert abs(ours.double() - gold) <= abs(naive_same.double() - gold) + tol
    assert (g_ours.double() - g_gold).abs().max() <= (g_naive.double() - g_gold).abs().max() + tol

    hs, ht, w, _ = (x.to(dtype) for x in _fused_case(18, p=(32,), h=24, v=200))
    for topk in (None, 20):
        gold_hs = hs.double().requires_grad_(True)
        gold = naive_fused(gold_hs, ht.double(), w.double(), temperature=2.0, topk=topk)
        (g_gold,) = torch.autograd.grad(gold, gold_hs)
        h = hs.clone().requires_grad_(True)
        ours = mk.fused_linear_kd_kl_loss(h, ht, w, temperature=2.0, topk=topk)
        (g_ours,) = torch.autograd.grad(ours, h)
        h = hs.clone().requires_grad_(True)
        naive_same = naive_fused(h, ht, w, temperature=2.0, topk=topk)
        (g_naive,) = torch.autograd.grad(naive_same, h)
        assert g_ours.dtype == dtype
        assert abs(ours.double() - gold) <= abs(naive_same.double() - gold) + tol
        assert (g_ours.double() - g_gold).abs().max() <= (g_naive.double() - g_gold).abs().max() + tol
