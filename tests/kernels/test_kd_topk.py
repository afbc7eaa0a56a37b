"""The top-k KD loss (issue 25): the teacher given as its top k, the teacher's selection and its ties rule, the
sparse student (native), the tail bucket, on every backend against float64 gold formulas (tests/naive.py).

Backends: torch; native with the student's dense tiles and with its sparse (gathered) form, both forced through
``kd_cost.topk_strategy``; Triton (CUDA, or its interpreter at small shapes, float32 against the float64 gold).
"""
import os

import pytest
import torch
from naive import fused_linear_kd_kl as naive_fused
from naive import kd_kl_given as naive_given

import mode_kernels as mk
from mode_kernels import kd_cost
from mode_kernels.contract import TIES_RULE

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "native-dense", "native-sparse"] + (["triton"] if TRITON else [])
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's -inf arithmetic


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend name for the op; native-dense / native-sparse force the student's form."""
    name = request.param
    if name.startswith("native"):
        if not mk.backends.native_available():
            pytest.skip("native kernels unavailable")
        form = name.split("-")[1]
        monkeypatch.setattr(kd_cost, "topk_strategy", lambda *args: form)
        return "native"
    if name == "triton":
        pytest.importorskip("triton")
    return name


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(backend):
    return dict(atol=2e-5, rtol=2e-4) if backend == "triton" else dict(atol=1e-10, rtol=1e-9)


def _problem(rows, hidden, vocab, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(rows, hidden, generator=g, dtype=torch.float64) * scale
    ht = torch.randn(rows, hidden, generator=g, dtype=torch.float64) * scale
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, generator=g) > 0.25
    return hs.to(dtype), ht.to(dtype), w.to(dtype), mask


def _given_gold(hs, w, top, lo, hi, temperature, mask, reduction, tail=False):
    hs64, w64 = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = naive_given(hs64, w64[lo:hi], top.indices - lo, top.logits.double(), temperature, mask, reduction,
                       top.logsumexp.double() if tail else None)
    return hs64, w64, loss


def _grads(loss, inputs, grad_output):
    return torch.autograd.grad(loss, inputs, grad_outputs=grad_output)


CASES = [  # rows, hidden, vocab, (lo, hi), k, temperature, reduction, trainable weight
    (37, 16, 60, (5, 55), 7, 2.0, "mean", True),
    (29, 24, 41, None, 1, 0.5, "sum", False),
    (33, 8, 70, (3, 20), 17, 1.0, "none", True),   # k equal to the slice
    (5, 13, 33, (0, 31), 30, 3.0, "mean", False),   # odd sizes, few positions
]


@pytest.mark.parametrize("rows,hidden,vocab,vocab_range,k,temperature,reduction,trainable", CASES)
def test_given_teacher_matches_float64_gold(backend, rows, hidden, vocab, vocab_range, k, temperature, reduction,
                                            trainable):
    dtype = _dtype_for(backend)
    hs, ht, w, mask = _problem(rows, hidden, vocab, dtype)
    lo, hi = vocab_range or (0, vocab)
    top = mk.teacher_topk(ht, w, k, vocab_range=vocab_range, temperature=temperature, backend="torch")
    hs.requires_grad_()
    w.requires_grad_(trainable)
    kw = dict(temperature=temperature, mask=mask, vocab_range=vocab_range, reduction=reduction)
    out = mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, backend=backend, **kw)
    hs64, w64, gold = _given_gold(hs, w, top, lo, hi, temperature, mask, reduction)
    torch.testing.assert_close(out.double(), gold, **_tol(backend))
    grad_output = torch.rand_like(gold) + 0.5  # != 1
    inputs = [hs, w] if trainable else [hs]
    ours = _grads(out, inputs, grad_output.to(out.dtype))
    want = _grads(gold, [hs64, w64][: len(inputs)], grad_output)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.double(), b, **_tol(backend))


@pytest.mark.parametrize("k", [4, 25])
def test_fused_topk_equals_the_given_form_and_the_naive_topk_loss(backend, k):
    dtype = _dtype_for(backend)
    hs, ht, w, mask = _problem(31, 12, 40, dtype, seed=1)
    hs.requires_grad_()
    kw = dict(temperature=2.0, mask=mask, vocab_range=(3, 28))
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=k, backend=backend, **kw)
    hs64 = hs.detach().double().requires_grad_()
    gold = naive_fused(hs64, ht.double(), w.double(), topk=k, **kw)
    torch.testing.assert_close(out.double(), gold, **_tol(backend))
    torch.testing.assert_close(torch.autograd.grad(out, hs)[0].double(), torch.autograd.grad(gold, hs64)[0],
                               **_tol(backend))


def test_k_equal_to_the_slice_is_the_dense_loss(backend):
    dtype = _dtype_for(backend)
    hs, ht, w, mask = _problem(23, 10, 30, dtype, seed=2)
    kw = dict(temperature=2.0, mask=mask, vocab_range=(4, 24), reduction="none")
    dense = mk.fused_linear_kd_kl_loss(hs, ht, w, backend="torch", **kw)
    full = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=20, backend=backend, **kw)
    tail = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=20, topk_tail=True, backend=backend, **kw)
    torch.testing.assert_close(full, dense, **_tol(backend))
    torch.testing.assert_close(tail, dense, **_tol(backend))


def test_ties_take_the_lower_ids_on_every_backend(backend):
    """Small integer hidden states and weights: every logit is an exact integer in any backend's GEMM, so many
    are equal, also at the k-th place; the lower ids win (TIES_RULE), as a stable descending sort takes them."""
    dtype = _dtype_for(backend)
    g = torch.Generator().manual_seed(3)
    ht = torch.randint(-2, 3, (9, 8), generator=g).to(dtype)
    w = torch.randint(-2, 3, (36, 8), generator=g).to(dtype)
    for k in (1, 5, 13):
        top = mk.teacher_topk(ht, w, k, vocab_range=(2, 34), backend=backend)
        logits = ht.double() @ w[2:34].double().t()
        want = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values + 2
        assert torch.equal(top.indices, want), TIES_RULE
        torch.testing.assert_close(top.logits.double(), logits.gather(-1, want - 2))
        assert top.indices.dtype == torch.int64


def test_minus_inf_teachers_are_masked_and_dead_rows_give_zero(backend):
    dtype = _dtype_for(backend)
    hs, ht, w, mask = _problem(11, 8, 20, dtype, seed=4)
    top = mk.teacher_topk(ht, w, 6, backend="torch")
    logits = top.logits.clone()
    logits[0] = float("-inf")                          # a dead row
    logits[1, :3] = float("-inf")                      # masked entries
    logits[2, 1] = torch.finfo(logits.dtype).min       # the dtype's most negative value: masked too
    top = mk.TeacherTopk(top.indices, logits)
    hs.requires_grad_()
    out = mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, reduction="none", backend=backend)
    hs64, _, gold = _given_gold(hs, w, top, 0, 20, 1.0, None, "none")
    torch.testing.assert_close(out.double(), gold, **_tol(backend))
    assert float(out[0]) == 0.0
    d_hs = torch.autograd.grad(out.sum(), hs)[0]
    assert bool((d_hs[0] == 0).all())
    # the gold's own gradient on the dead row is NaN (a log-softmax of -inf only): compare the others
    torch.testing.assert_close(d_hs[1:].double(), torch.autograd.grad(gold.sum(), hs64)[0][1:], **_tol(backend))


@pytest.mark.parametrize("k", [3, 9])
def test_tail_bucket_matches_float64_gold(backend, k):
    dtype = _dtype_for(backend)
    hs, ht, w, mask = _problem(19, 10, 30, dtype, seed=5)
    hs.requires_grad_()
    w.requires_grad_()
    kw = dict(temperature=2.0, mask=mask, vocab_range=(2, 26))
    top = mk.teacher_topk(ht, w, k, logsumexp=True, **{k_: v for k_, v in kw.items() if k_ != "mask"})
    given = mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, topk_tail=True, backend=backend, **kw)
    fused = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=k, topk_tail=True, backend=backend, **kw)
    hs64, w64, gold = _given_gold(hs, w, top, 2, 26, 2.0, mask, "mean", tail=True)
    want = torch.autograd.grad(gold, [hs64, w64])
    for out in (given, fused):
        torch.testing.assert_close(out.double(), gold, **_tol(backend))
        for a, b in zip(torch.autograd.grad(out, [hs, w]), want):
            torch.testing.assert_close(a.double(), b, **_tol(backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_d_hidden_within_one_percent_of_float64_gold(backend, dtype):
    """Logits accumulated and normalised in float32 on every backend: d hidden in 16 bits within 1% (relative
    norm) of the float64 gold at realistic logit scales (|logits| of tens, an lm_head's H ** -0.5 init)."""
    rows, hidden, vocab, k = (24, 64, 96, 16) if backend == "triton" else (64, 128, 512, 64)
    g = torch.Generator().manual_seed(6)
    hs = (torch.randn(rows, hidden, generator=g) * 4).to(dtype).requires_grad_()
    ht = (torch.randn(rows, hidden, generator=g) * 4).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5 * 3).to(dtype)
    for kw in (dict(topk=k), dict(topk=k, topk_tail=True)):
        out = mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=1.0, backend=backend, **kw)
        d_hs = torch.autograd.grad(out, hs)[0]
        hs64 = hs.detach().double().requires_grad_()
        top = mk.teacher_topk(ht.double(), w.double(), k, logsumexp=True, backend="torch")
        gold = mk.fused_linear_kd_kl_loss(hs64, None, w.double(), teacher_topk=top, topk_tail=kw.get("topk_tail",
                                          False), backend="torch")
        want = torch.autograd.grad(gold, hs64)[0]
        assert d_hs.dtype == dtype
        error = float((d_hs.double() - want).norm() / want.norm())
        assert error < 0.01, (kw, error)


def test_sparse_native_gathers_without_the_dense_tiles(monkeypatch):
    """With the sparse form the native backend never runs the reference's dense chunks, and matches them."""
    if not mk.backends.native_available():
        pytest.skip("native kernels unavailable")
    from mode_kernels import reference
    hs, ht, w, mask = _problem(40, 16, 300, torch.float32, seed=7)
    hs.requires_grad_()
    top = mk.teacher_topk(ht, w, 8, backend="native")
    dense = mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, mask=mask, backend="torch")
    assert kd_cost.topk_strategy("native", 40, 16, 300, 8, False) == "sparse"

    def refuse(*args, **kwargs):
        raise AssertionError("the dense reference ran")
    monkeypatch.setattr(reference.kd_kl, "fused_linear_kd_kl_given", refuse)
    sparse = mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, mask=mask, backend="native")
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(torch.autograd.grad(sparse, hs)[0], torch.autograd.grad(dense, hs)[0])


def test_cost_model_picks_dense_on_gpus_and_where_k_is_the_slice():
    anole = kd_cost.estimates("H100 SXM", 8192, 4096, 8192, 256, 2, False)
    assert anole["dense"] < anole["sparse"]
    assert kd_cost.topk_strategy("native", 2048, 256, 8192, 256, False) == "sparse"
    assert kd_cost.topk_strategy("native", 2048, 256, 8192, 8192, False) == "dense"
    assert kd_cost.topk_strategy("torch", 2048, 256, 8192, 256, False) == "dense"
    assert kd_cost.topk_strategy("triton", 2048, 256, 8192, 256, False) == "dense"


def _given_args():
    hs, ht, w, _ = _problem(6, 4, 10, torch.float32, seed=8)
    top = mk.teacher_topk(ht, w, 3, vocab_range=(2, 9), logsumexp=True)
    return hs, w, top


BAD_GIVEN = [
    (lambda top: top._replace(indices=top.indices.float()), "teacher_topk.indices"),
    (lambda top: top._replace(indices=top.indices[:, :2]), "teacher_topk.logits"),
    (lambda top: top._replace(indices=top.indices[:5]), "teacher_topk.indices"),
    (lambda top: top._replace(indices=top.indices.clone().index_fill_(1, torch.tensor([0]), 1)),
     "teacher_topk.indices"),                                                                   # below the slice
    (lambda top: top._replace(indices=top.indices.clone().index_fill_(1, torch.tensor([0]), 9)),
     "teacher_topk.indices"),                                                                   # at its end
    (lambda top: top._replace(indices=top.indices[:, [0, 0, 1]]), "teacher_topk.indices"),      # repeated id
    (lambda top: top._replace(logits=top.logits.int()), "teacher_topk.logits"),
    (lambda top: top._replace(logits=top.logits.clone().fill_(float("nan"))), "teacher_topk.logits"),
    (lambda top: top._replace(logits=top.logits.clone().fill_(float("inf"))), "teacher_topk.logits"),
    (lambda top: top._replace(logsumexp=top.logsumexp[:3]), "teacher_topk.logsumexp"),
    (lambda top: top._replace(logsumexp=top.logsumexp - 5), "teacher_topk.logsumexp"),
    (lambda top: tuple(top), "teacher_topk"),
]


@pytest.mark.parametrize("corrupt,name", BAD_GIVEN)
def test_bad_given_teacher_raises_naming_the_argument(corrupt, name):
    hs, w, top = _given_args()
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=corrupt(top), vocab_range=(2, 9), topk_tail=True)


@pytest.mark.parametrize("kwargs,name", [
    (dict(topk=2), "topk"), (dict(topk_tail=1), "topk_tail"), (dict(teacher_weight=torch.zeros(10, 4)),
                                                               "teacher_weight"),
])
def test_bad_given_options_raise_naming_the_argument(kwargs, name):
    hs, w, top = _given_args()
    with pytest.raises(ValueError, match=name):
        mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, vocab_range=(2, 9), **kwargs)


def test_bad_selection_and_tail_arguments_raise_naming_them():
    hs, ht, w, _ = _problem(6, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="teacher_hidden"):
        mk.fused_linear_kd_kl_loss(hs, ht, w, teacher_topk=mk.teacher_topk(ht, w, 2))
    with pytest.raises(ValueError, match="teacher_hidden"):
        mk.fused_linear_kd_kl_loss(hs, None, w)
    with pytest.raises(ValueError, match="topk_tail"):
        mk.fused_linear_kd_kl_loss(hs, ht, w, topk_tail=True)
    with pytest.raises(ValueError, match="k:"):
        mk.teacher_topk(ht, w, 11)
    with pytest.raises(ValueError, match="teacher_topk.logsumexp"):
        mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=mk.teacher_topk(ht, w, 2), topk_tail=True)


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("k,trainable", [(9, False), (300, True)])
def test_triton_topk_over_several_chunks_and_hidden_blocks(monkeypatch, k, trainable):
    """The Triton top-k path where its launches split the work: positions in several chunks (the grad kernel's
    loss rows, masks and row weights offset per chunk), d hidden in several column blocks (every block's programs
    scatter the same d logits), a trainable weight (d W summed over chunks), and k above the selection kernel's
    register bound (``MAX_SELECT_K``: the matmul + reference selection route). Against the float64 gold."""
    from mode_kernels.triton import kd_topk

    assert (k > kd_topk.MAX_SELECT_K) == (k == 300)  # the parametrisation takes both routes
    plan, planned = kd_topk.chunk_plan, []
    monkeypatch.setattr(kd_topk, "chunk_plan", lambda *args: planned.append(args) or (16, plan(*args)[1]))
    rows, hidden, vocab, vocab_range = 45, 70, 330, (7, 320)
    hs, ht, w, mask = _problem(rows, hidden, vocab, torch.float32, seed=8)
    hs.requires_grad_()
    w.requires_grad_(trainable)
    kw = dict(temperature=1.5, mask=mask, vocab_range=vocab_range)
    out = mk.fused_linear_kd_kl_loss(hs, ht, w, topk=k, backend="triton", **kw)
    inputs = [hs, w] if trainable else [hs]
    ours = torch.autograd.grad(out, inputs)
    hs64, w64 = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_(trainable)
    gold = naive_fused(hs64, ht.double(), w64, topk=k, **kw)
    want = torch.autograd.grad(gold, [hs64, w64][: len(inputs)])
    assert planned and all(args[0] == rows for args in planned)  # 45 positions in chunks of 16
    torch.testing.assert_close(out.double(), gold, **_tol("triton"))
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.double(), b, **_tol("triton"))


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("k", [5, 16, 40])
def test_triton_selection_kernel_equals_the_reference_selection(k):
    """``_select_kernel`` against the reference's ``teacher_topk`` on the same float32 logits: the same ids (ties
    at the k-th: integer logits, zeros, -0.0 and +0.0 alike), the same values (bit for bit where the logits are
    integers; the GEMMs' summation orders differ on the others) and the slice's logsumexp."""
    g = torch.Generator().manual_seed(9)
    ht = torch.randint(-1, 2, (40, 16), generator=g).float()
    ht[3] = 0.0                                  # every logit 0
    ht[4] = -0.0                                 # every logit -0.0 or 0.0
    w = torch.randint(-1, 2, (90, 16), generator=g).float()
    w[50:60] = torch.randn(10, 16, generator=g)  # some non-integer logits too
    for temperature in (1.0, 2.5):
        ours = mk.teacher_topk(ht, w, k, vocab_range=(3, 88), temperature=temperature, logsumexp=True,
                               backend="triton")
        want = mk.teacher_topk(ht, w, k, vocab_range=(3, 88), temperature=temperature, logsumexp=True,
                               backend="torch")
        assert torch.equal(ours.indices, want.indices)
        integer = want.logits == want.logits.round()
        assert torch.equal(ours.logits[integer], want.logits[integer])
        torch.testing.assert_close(ours.logits, want.logits, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(ours.logsumexp, want.logsumexp, atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_kernel_never_dereferences_an_id_outside_the_slice():
    """The op checks the given ids on the host (on CUDA only with sync checks on); the kernel itself, given an id
    outside the slice, reads and writes nothing there: that row's loss and d hidden are NaN, the others exact."""
    from mode_kernels.contract import FusedLinearKdKlNeeds, kd_options
    from mode_kernels.triton import kd_topk

    hs, ht, w, _ = _problem(20, 24, 50, torch.float32, seed=10)
    top = mk.teacher_topk(ht, w, 6, vocab_range=(5, 45), backend="torch")
    bad = top._replace(indices=top.indices.clone())
    bad.indices[3, 2], bad.indices[7, 0] = 45, -(2 ** 40) + 6  # past the slice's end; far below (no int32 wrap)
    options = kd_options(1.0, 5, 45, 6, False)
    weights = torch.full((20,), 1 / 20)
    good = kd_topk.fused_linear_kd_kl_given(hs, top, w, None, options, weights, FusedLinearKdKlNeeds(True, False))
    ours = kd_topk.fused_linear_kd_kl_given(hs, bad, w, None, options, weights, FusedLinearKdKlNeeds(True, False))
    rows = torch.tensor([3, 7])
    assert ours.loss[rows].isnan().all() and ours.d_hidden[rows].isnan().all()
    others = torch.ones(20, dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(ours.loss[others], good.loss[others])
    torch.testing.assert_close(ours.d_hidden[others], good.d_hidden[others])
