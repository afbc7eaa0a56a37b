"""Triton KD-KL kernels (logits and fused-linear) against the reference backend.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by conftest.py).
float32: close to the float32 reference. bfloat16/float16: the foundation rule
|ours - gold64| <= |naive torch in the same dtype - gold64| + tol, gold = reference in float64.
"""
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")

import mode_kernels as mk  # noqa: E402
from mode_kernels import kd_memory  # noqa: E402
from mode_kernels.contract import FusedLinearKdKlNeeds, KdOptions  # noqa: E402
from mode_kernels.reference import kd_kl as ref  # noqa: E402
from mode_kernels.triton import fused_linear_kd_kl as tfused  # noqa: E402
from mode_kernels.triton import kd_kl as tkd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs the kernels' -inf arithmetic (absent entries, dead rows) in numpy, which
# warns about it; the results are selected away by tl.where and checked below (why the kernels
# compute them: mode_kernels/triton/kd_kl.py, online_kl_update).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.fixture(params=[False, True], ids=["row-programs", "vocab-split"])
def vocab_split(request, monkeypatch):
    """Both forms of the row passes: one program per row block, or (True) the split over the
    vocabulary with merged statistics, forced on these small shapes by segments of 64 columns and
    more (the GPU's minimum is 1024; the interpreter plans for 132 SMs, so every test shape has
    few rows). Returns (split, the segment widths of the split passes that ran)."""
    monkeypatch.setattr(tkd, "MIN_SPLIT_COLS", 64 if request.param else 1 << 30)
    widths = []
    real = tkd._split_forward
    monkeypatch.setattr(tkd, "_split_forward", lambda *args: widths.append(args[-1]) or real(*args))
    return request.param, widths


def assert_split_ran(vocab_split, n_cols):
    split, widths = vocab_split
    assert bool(widths) == (split and n_cols > tkd.MIN_SPLIT_COLS), widths  # more than one segment


def special_rows(teacher, mask, lo, hi):
    """Rows 1-4 get the edge cases: teacher all -inf in the slice except one entry, all finfo.min
    but one, no finite teacher logit in the slice (dead), masked out."""
    lowest = torch.finfo(teacher.dtype).min
    teacher[1, lo:hi] = float("-inf")
    teacher[1, hi - 1] = 1.5
    teacher[2, lo:hi] = lowest
    teacher[2, lo] = -0.5
    teacher[3, lo:hi] = float("-inf")
    mask[4] = False


def make_logits(rows, vocab, lo, hi, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Rows live inside a wider buffer: a row stride that is not the vocab size.
    student = (torch.randn(rows, vocab + 3, generator=g) * 3)[:, 1:vocab + 1]
    teacher = (torch.randn(rows, vocab + 5, generator=g) * 3)[:, :vocab]
    mask = torch.ones(rows, dtype=torch.bool)
    special_rows(teacher, mask, lo, hi)
    grad_rows = torch.randn(rows, generator=g)
    return [x.to(DEVICE) for x in (student.to(dtype), teacher.to(dtype), mask, grad_rows)]


def assert_no_worse(ours, naive, gold, tol, what):
    """Per entry, |ours - gold| <= |naive - gold| + tol, tol relative for entries above 1 (a d weight
    entry of 3.4 has a bfloat16 spacing of 0.016: one rounding of the d logits more or less moves it
    by more than an absolute 1e-2)."""
    err = (ours.double() - gold).abs()
    allowed = (naive.double() - gold).abs() + tol * gold.abs().clamp(min=1)
    worst = (err - allowed).max().item()
    assert worst <= 0, f"{what}: error exceeds naive's by {worst:.3g} (max error {err.max().item():.3g})"


# ----------------------------------------------------------------------------- kd_kl on logits
LOGIT_CASES = [  # vocab, (lo, hi), temperature
    (1, (0, 1), 1.0),
    (17, (0, 17), 0.5),
    (17, (3, 11), 2.0),
    (1000, (100, 900), 4.0),
    (1000, (0, 1000), 1.0),
    (8194, (2, 8194), 2.0),
]


@pytest.mark.parametrize("vocab,vocab_range,temperature", LOGIT_CASES)
def test_kd_kl_float32_matches_reference(vocab, vocab_range, temperature, vocab_split):
    lo, hi = vocab_range
    student, teacher, mask, grad_rows = make_logits(7, vocab, lo, hi, torch.float32, seed=vocab + lo)
    ours = tkd.kd_kl_forward(student, teacher, mask, KdOptions(temperature, lo, hi))
    assert_split_ran(vocab_split, hi - lo)
    gold = ref.kd_kl_forward(student, teacher, mask, KdOptions(temperature, lo, hi))
    for name, a, b in zip(("loss", "lse_s", "lse_t"), ours, gold):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert ours[0][3] == 0 and ours[0][4] == 0 and ours[1][3] == 0 and ours[2][4] == 0
    if hi - lo > 1:  # (a one-entry slice has KL 0) the one-entry teacher rows still count
        assert ours[0][[0, 1, 2, 5, 6]].gt(0).all()

    d_ours = tkd.kd_kl_backward(grad_rows, student, teacher, mask, ours[1], ours[2], KdOptions(temperature, lo, hi))
    d_gold = ref.kd_kl_backward(grad_rows, student, teacher, mask, gold[1], gold[2], KdOptions(temperature, lo, hi))
    assert d_ours.shape == student.shape and d_ours.dtype == student.dtype
    torch.testing.assert_close(d_ours, d_gold, rtol=1e-5, atol=1e-6)
    assert d_ours[3].eq(0).all() and d_ours[4].eq(0).all()
    assert d_ours[:, :lo].eq(0).all() and d_ours[:, hi:].eq(0).all()


def test_kd_kl_live_row_with_zero_logsumexps():
    """lse_s = lse_t = 0 is how the forward marks a dead row (teacher all -inf); a live row can
    have both 0 too (logits normalised to log-probabilities) and must still get its gradient."""
    student = torch.tensor([[0.4, -0.3, 0.2, -1.0], [0.1, 0.2, 0.3, 0.4]], device=DEVICE)
    teacher = torch.tensor([[0.3, -0.2, 0.1, -0.5], [float("-inf")] * 4], device=DEVICE)
    student[0] -= torch.logsumexp(student[0], 0)
    teacher[0] -= torch.logsumexp(teacher[0], 0)
    zeros, grad = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    d_ours = tkd.kd_kl_backward(grad, student, teacher, None, zeros, zeros, KdOptions(1.0, 0, 4))
    d_gold = ref.kd_kl_backward(grad, student, teacher, None, zeros, zeros, KdOptions(1.0, 0, 4))
    assert d_ours[0].abs().sum() > 0.1 and d_ours[1].eq(0).all()
    torch.testing.assert_close(d_ours, d_gold, rtol=1e-5, atol=1e-6)


def naive_rows(student, teacher, temperature, lo, hi):
    """T^2 KL per row, all in the logits' dtype (the naive path of that dtype)."""
    log_ps = torch.log_softmax(student[:, lo:hi] / temperature, -1)
    log_pt = torch.log_softmax(teacher[:, lo:hi] / temperature, -1)
    return temperature ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,vocab_range,temperature", [(1000, (100, 900), 0.5), (8194, (0, 8194), 4.0)])
def test_kd_kl_half_no_worse_than_naive(dtype, vocab, vocab_range, temperature, vocab_split):
    lo, hi = vocab_range
    g = torch.Generator().manual_seed(7)
    student, teacher = [(torch.randn(5, vocab, generator=g) * 2).to(dtype).to(DEVICE) for _ in range(2)]
    mask = torch.tensor([True, True, False, True, True], device=DEVICE)
    grad_rows = torch.randn(5, generator=g).to(DEVICE)
    gold = ref.kd_kl_forward(student.double(), teacher.double(), mask, KdOptions(temperature, lo, hi))
    d_gold = ref.kd_kl_backward(grad_rows.double(), student.double(), teacher.double(), mask, gold[1], gold[2],
                                KdOptions(temperature, lo, hi))
    s = student.clone().requires_grad_()
    naive = torch.where(mask, naive_rows(s, teacher, temperature, lo, hi), 0)
    (naive * grad_rows.to(dtype)).sum().backward()

    ours = tkd.kd_kl_forward(student, teacher, mask, KdOptions(temperature, lo, hi))
    d_ours = tkd.kd_kl_backward(grad_rows, student, teacher, mask, ours[1], ours[2], KdOptions(temperature, lo, hi))
    assert_split_ran(vocab_split, hi - lo)
    assert d_ours.dtype == dtype
    assert_no_worse(ours[0], naive.detach(), gold[0], TOL[dtype], "loss")
    assert_no_worse(d_ours, s.grad, d_gold, TOL[dtype], "d student")


@pytest.mark.parametrize("sms", [108, 132])
def test_vocab_split_fills_the_gpu_when_rows_are_few(sms):
    """The launchers' plan (arithmetic only): no split once the rows alone give PROGRAMS_PER_SM
    programs per SM or the slice is under two segments; otherwise power-of-two segments of at least
    MIN_SPLIT_COLS columns, at most MAX_SPLITS (+1 for alignment) of them, enough for the target
    unless the minimum width stops it, and the segments cover the slice exactly."""
    target = tkd.PROGRAMS_PER_SM * sms
    for rows in (1, 3, 16, 100, target - 1, target, 4 * target):
        for lo, hi in ((0, 1000), (0, 2048), (4, 8196), (2, 8194), (0, 65536), (0, 1 << 20), (100, 70000)):
            cols = tkd.vocab_split_cols(rows, lo, hi, sms)
            if rows >= target or hi - lo <= tkd.MIN_SPLIT_COLS:
                assert cols == 0
                continue
            assert cols >= tkd.MIN_SPLIT_COLS and cols & (cols - 1) == 0
            segments = tkd.n_segments(lo, hi, cols)
            assert 2 <= segments <= tkd.MAX_SPLITS + 1
            fewest = triton.next_power_of_2(triton.cdiv(hi - lo, tkd.MAX_SPLITS))
            assert rows * segments >= target or cols in (tkd.MIN_SPLIT_COLS, fewest)
            bounds = [(max(lo, (lo // cols + j) * cols), min(hi, (lo // cols + j + 1) * cols)) for j in range(segments)]
            assert bounds[0][0] == lo and bounds[-1][1] == hi and all(a < b for a, b in bounds)
            assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert tkd.vocab_split_cols(16, 4, 8196, 132) == 1024  # MoDE's image codes, a 16-position chunk: 9 segments


def test_vocab_split_is_deterministic(monkeypatch):
    """No atomics: the same inputs give bitwise the same losses and gradients."""
    monkeypatch.setattr(tkd, "MIN_SPLIT_COLS", 64)
    student, teacher, mask, grad_rows = make_logits(5, 300, 7, 290, torch.float32, seed=8)
    runs = []
    for _ in range(2):
        loss, lse_s, lse_t = tkd.kd_kl_forward(student, teacher, mask, KdOptions(2.0, 7, 290))
        runs.append((loss, lse_s, tkd.kd_kl_backward(grad_rows, student, teacher, mask, lse_s, lse_t,
                                                     KdOptions(2.0, 7, 290))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_kd_kl_float64_is_refused():
    x = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="student"):
        tkd.kd_kl_forward(x, x.float(), None, KdOptions(1.0, 0, 3))
    with pytest.raises(ValueError, match="teacher"):
        tkd.kd_kl_backward(torch.ones(2, device=DEVICE), x.float(), x, None, x[:, 0].float(), x[:, 0].float(),
                           KdOptions(1.0, 0, 3))


# ----------------------------------------------------------------------------- fused linear
def make_hidden(rows, hidden, vocab, dtype, shared, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ht = [torch.randn(rows, hidden, generator=g) for _ in range(2)]
    ws = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2
    wt = None if shared else ws + 0.3 * torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    mask = torch.ones(rows, dtype=torch.bool)
    mask[1] = mask[-1] = False
    grad_rows = torch.randn(rows, generator=g)
    move = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return move(hs), move(ht), move(ws), move(wt), mask.to(DEVICE), grad_rows.to(DEVICE)


def gold_fused(hs, ht, ws, wt, mask, temperature, lo, hi, topk, grad_rows, need_dw):
    """The reference backend in float64 (it is checked against tests/naive.py in test_kd_kl.py)."""
    up = lambda x: None if x is None else x.double()  # noqa: E731
    return ref.fused_linear_kd_kl(up(hs), up(ht), up(ws), up(wt), mask, KdOptions(temperature, lo, hi, topk),
                                  up(grad_rows), FusedLinearKdKlNeeds(True, need_dw))


FUSED_CASES = [  # rows, vocab, hidden, (lo, hi), temperature, teacher weight shared, need_dw, topk
    (13, 1, 20, (0, 1), 1.0, True, True, None),
    (21, 17, 40, (0, 17), 0.5, False, True, None),
    (37, 300, 24, (30, 290), 2.0, True, False, None),
    (19, 300, 33, (0, 300), 4.0, False, True, 7),
    (9, 1000, 20, (4, 1000), 1.0, True, True, 996),
]


@pytest.mark.parametrize("rows,vocab,hidden,vocab_range,temperature,shared,need_dw,topk", FUSED_CASES)
def test_fused_float32_matches_float64_gold(rows, vocab, hidden, vocab_range, temperature, shared, need_dw, topk,
                                            vocab_split):
    lo, hi = vocab_range
    hs, ht, ws, wt, mask, grad_rows = make_hidden(rows, hidden, vocab, torch.float32, shared, seed=vocab + hidden)
    loss, d_hs, d_ws = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(temperature, lo, hi, topk), grad_rows,
                                                 FusedLinearKdKlNeeds(True, need_dw))
    assert_split_ran(vocab_split, hi - lo if topk is None else 0)  # top-k: kd_topk's own row pass, never split
    gold = gold_fused(hs, ht, ws, wt, mask, temperature, lo, hi, topk, grad_rows, need_dw)
    assert loss.dtype == torch.float32 and d_hs.dtype == torch.float32
    torch.testing.assert_close(loss.double(), gold[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_hs.double(), gold[1], rtol=1e-5, atol=1e-5)
    assert loss[1] == 0 and d_hs[1].eq(0).all() and d_hs[-1].eq(0).all()
    if need_dw:
        assert d_ws.shape == ws.shape and d_ws.dtype == ws.dtype
        torch.testing.assert_close(d_ws.double(), gold[2], rtol=1e-5, atol=1e-5)
        assert d_ws[:lo].eq(0).all() and d_ws[hi:].eq(0).all()
    else:
        assert d_ws is None
    # Without gradients (evaluation, the forward of reduction "none") the same losses.
    alone = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(temperature, lo, hi, topk), None,
                                      FusedLinearKdKlNeeds(False, False))
    assert alone[1] is None and alone[2] is None
    torch.testing.assert_close(alone[0], loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("topk", [None, 5])
def test_fused_chunks_follow_the_memory_bound(topk, monkeypatch):
    """With the bound of 2^24 logits and more applied to P = 40 positions, chunks of a few rows;
    the d weight is accumulated across them."""
    monkeypatch.setattr(kd_memory, "BOUNDED_FROM_LOGITS", 0)
    hs, ht, ws, wt, mask, grad_rows = make_hidden(40, 16, 64, torch.float32, False, seed=2)
    steps = []
    real = tfused.chunk_rows
    monkeypatch.setattr(tfused, "chunk_rows", lambda *a: steps.append(real(*a)) or steps[-1])
    loss, d_hs, d_ws = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(2.0, 0, 64, topk), grad_rows,
                                                 FusedLinearKdKlNeeds(True, True))
    gold = gold_fused(hs, ht, ws, wt, mask, 2.0, 0, 64, topk, grad_rows, True)
    assert 1 < steps[0] < 10, steps
    for ours, want in zip((loss, d_hs, d_ws), gold):
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_masked_teacher_logits(vocab_split):
    """Teacher logits near the float32 minimum or -inf (weights of -1e38 against positive hidden
    states) have probability 0 and count 0, here in every position, with and without top-k; with
    the split, whole segments hold nothing else."""
    hs, ht, ws, _, mask, grad_rows = make_hidden(11, 16, 50, torch.float32, True, seed=4)
    ht = ht.abs() + 0.5
    wt = ws.clone()
    wt[[3, 10, 11, 40], 0] = -1e38
    wt[16:32, 0] = -1e38
    for topk in (None, 20):
        loss, d_hs, _ = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(0.5, 0, 50, topk), grad_rows,
                                                  FusedLinearKdKlNeeds(True, False))
        gold = gold_fused(hs, ht, ws, wt, mask, 0.5, 0, 50, topk, grad_rows, False)
        assert torch.isfinite(loss).all() and torch.isfinite(d_hs).all()
        torch.testing.assert_close(loss.double(), gold[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_hs.double(), gold[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared,topk", [(True, None), (False, 100)])
def test_fused_half_no_worse_than_naive(dtype, shared, topk, vocab_split):
    vocab, hidden, lo, hi, temperature = 300, 48, 20, 290, 2.0
    hs, ht, ws, wt, mask, grad_rows = make_hidden(21, hidden, vocab, dtype, shared, seed=3)
    gold = gold_fused(hs, ht, ws, wt, mask, temperature, lo, hi, topk, grad_rows, True)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    teacher = ht @ (ws if wt is None else wt).t()
    student = h @ w.t()
    if topk is not None:
        teacher, index = teacher[:, lo:hi].topk(topk, dim=-1)
        student = student[:, lo:hi].gather(-1, index)
    naive = torch.where(mask, naive_rows(student, teacher, temperature, *((lo, hi) if topk is None else (0, topk))),
                        0)
    (naive * grad_rows.to(dtype)).sum().backward()

    loss, d_hs, d_ws = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(temperature, lo, hi, topk), grad_rows,
                                                 FusedLinearKdKlNeeds(True, True))
    assert_split_ran(vocab_split, hi - lo if topk is None else 0)  # top-k: kd_topk's own row pass, never split
    assert d_hs.dtype == dtype and d_ws.dtype == dtype
    assert_no_worse(loss, naive.detach(), gold[0], TOL[dtype], "loss")
    assert_no_worse(d_hs, h.grad, gold[1], TOL[dtype], "d hidden")
    assert_no_worse(d_ws, w.grad, gold[2], TOL[dtype], "d weight")


def test_fused_float64_is_refused():
    x = torch.zeros(2, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="ws"):
        tfused.fused_linear_kd_kl(x.float(), x.float(), x, None, None, KdOptions(1.0, 0, 2), None,
                                  FusedLinearKdKlNeeds(False, False))


def test_grid_stride_loops_cover_every_row(monkeypatch):
    """With more row blocks (tiles) than the grid may hold (P up to ~1M), programs loop over them."""
    monkeypatch.setattr(tkd, "MAX_GRID", 1)
    monkeypatch.setattr(tfused, "MAX_GRID", 1)
    student, teacher, mask, grad_rows = make_logits(9, 50, 5, 45, torch.float32, seed=5)
    ours = tkd.kd_kl_forward(student, teacher, mask, KdOptions(2.0, 5, 45))
    gold = ref.kd_kl_forward(student, teacher, mask, KdOptions(2.0, 5, 45))
    torch.testing.assert_close(ours, gold, rtol=1e-5, atol=1e-5)
    d_ours = tkd.kd_kl_backward(grad_rows, student, teacher, mask, ours[1], ours[2], KdOptions(2.0, 5, 45))
    d_gold = ref.kd_kl_backward(grad_rows, student, teacher, mask, gold[1], gold[2], KdOptions(2.0, 5, 45))
    torch.testing.assert_close(d_ours, d_gold, rtol=1e-5, atol=1e-6)
    hs, ht, ws, wt, mask, grad_rows = make_hidden(70, 16, 300, torch.float32, True, seed=6)
    ours = tfused.fused_linear_kd_kl(hs, ht, ws, wt, mask, KdOptions(1.0, 0, 300), grad_rows,
                                     FusedLinearKdKlNeeds(True, False))
    gold = gold_fused(hs, ht, ws, wt, mask, 1.0, 0, 300, None, grad_rows, False)
    torch.testing.assert_close(ours[0].double(), gold[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), gold[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- through the public API
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_api_triton_matches_torch(reduction):
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 5, 300, generator=g).to(DEVICE)
    teacher = torch.randn(2, 5, 300, generator=g).to(DEVICE)
    mask = torch.rand(2, 5, generator=g).to(DEVICE) > 0.3
    results = []
    for backend in ("torch", "triton"):
        s = student.clone().requires_grad_()
        loss = mk.kd_kl_loss(s, teacher, temperature=2.0, mask=mask, vocab_range=(10, 290), topk=64,
                             reduction=reduction, backend=backend)
        loss.sum().backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)

    hs, ht = [torch.randn(2, 5, 24, generator=g).to(DEVICE) for _ in range(2)]
    weight = torch.randn(300, 24, generator=g).to(DEVICE) / 3
    results = []
    for backend in ("torch", "triton"):
        h, w = hs.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = mk.fused_linear_kd_kl_loss(h, ht, w, temperature=0.5, mask=mask, vocab_range=(10, 290), topk=40,
                                          reduction=reduction, backend=backend)
        (loss.sum() * 3).backward()  # grad_output != 1
        results.append((loss.detach(), h.grad, w.grad))
    for ours, gold in zip(results[1], results[0]):
        torch.testing.assert_close(ours, gold, rtol=1e-5, atol=1e-5)
