"""Triton routed LoRA (forward and every gradient) against the float64 reference.

Runs on CUDA, or on CPU in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU). float32 must match the float64 gold to 1e-5 of its largest magnitude;
bf16/fp16 must be, elementwise, no further from the gold than the naive dense formula computed
in the same dtype, plus tol times the gold's largest magnitude.
"""
import inspect
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import routed_lora_cases  # noqa: E402
from host_sync import NoHostSync  # noqa: E402
from routed_lora_cases import ALL_NEEDS, F64, GRAD_NAMES, cast, check_close, check_low_precision, naive_same_dtype, run  # noqa: E402
from routed_lora_cases import make_case as make_case_on_cpu  # noqa: E402

import mode_kernels as mk  # noqa: E402
from mode_kernels.contract import RoutedLoraOptions  # noqa: E402
from mode_kernels.reference import routed_lora as reference  # noqa: E402
from mode_kernels.routing import plan_routing  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from mode_kernels.triton import routed_lora as tri  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(*args, **kwargs):
    return make_case_on_cpu(*args, device=DEVICE, **kwargs)
# (tokens, K, N, r, experts per modality, options). Sizes are odd or off multiples of 16; with the
# interpreter's 32-row tiles, 33+ tokens span several row blocks. Every layout at rank 8, every rank
# at layout (4, 1) (a reduced cross product), then special cases.
LAYOUTS = [(4, 1), (2, 1), (3, 1), (8, 1), (16,), (1, 1), (2, 2)]
RANKS = [4, 6, 16, 32, 64]
CASES = {
    **{f"layout_{'_'.join(map(str, epm))}_r8": (37, 24, 40, 8, epm, {}) for epm in LAYOUTS},
    **{f"layout_4_1_r{r}": (35, 21, 18, r, (4, 1), {}) for r in RANKS},
    "one_one_no_router_no_bias": (21, 19, 33, 4, (1, 1), dict(router=False, bias=False)),
    "2_3_1_middle_modality_empty": (30, 20, 17, 16, (2, 3, 1), dict(ids=[0, 2] * 15)),
    "separate_lora_input": (29, 21, 18, 8, (4, 1), dict(separate=True, bias=False)),
    "one_token": (1, 17, 9, 8, (4, 1), dict(ids=[0])),
    "image_modality_empty": (20, 18, 20, 8, (4, 1), dict(ids=[0] * 20)),
    "text_modality_empty": (20, 18, 20, 4, (3, 1), dict(ids=[1] * 20)),
}


# How the backward computes dA, dR, dB: in the weight-grads pass, or summed by the dx GEMM in
# per-segment partials (plan_weight_grads picks it only at large sizes; forced here: 2 segments, or 1
# for one row block; with the interpreter's 32-row tiles the cases' token counts make them uneven).
WEIGHT_GRADS = {"weight_grads_apart": 0, "weight_grads_fused": 2}


def force_weight_grads(monkeypatch, segments):
    """Make the launcher plan this many segments (0: the separate pass), at most one per row block
    (as the planner does); returns the segment counts of the partials each weight-grads launch sums
    (None: it sums over the tokens)."""
    monkeypatch.setattr(tri, "plan_weight_grads", lambda num_tokens, out_cols, in_cols, lay, dy: min(
        segments, tri.max_weight_grad_segments(num_tokens, dy)))
    summed = []
    real = tri._weight_grads

    def spy(*args):
        summed.append(None if args[-1] is None else args[-1][0].shape[0])
        return real(*args)

    monkeypatch.setattr(tri, "_weight_grads", spy)
    return summed


@pytest.mark.parametrize("weight_grads", WEIGHT_GRADS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fp32_matches_reference(case, weight_grads, monkeypatch):
    num_tokens, k, n, r, epm, opts = CASES[case]
    force_weight_grads(monkeypatch, WEIGHT_GRADS[weight_grads])
    t, _, plan, dy = make_case(num_tokens, k, n, r, epm, **opts)
    gold = run(reference, t, plan, dy, epm)
    check_close(run(tri, cast(t, torch.float32), plan, dy, epm), gold, 1e-5, torch.float32)


@pytest.mark.parametrize("weight_grads", WEIGHT_GRADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["layout_4_1_r8", "layout_2_2_r8", "2_3_1_middle_modality_empty",
                                  "separate_lora_input"])
def test_low_precision_no_worse_than_naive(case, dtype, weight_grads, monkeypatch):
    num_tokens, k, n, r, epm, opts = CASES[case]
    force_weight_grads(monkeypatch, WEIGHT_GRADS[weight_grads])
    t, ids, plan, dy = make_case(num_tokens, k, n, r, epm, seed=1, **opts)
    low = cast(t, dtype)
    dy_low = dy.to(dtype)
    gold = run(reference, cast(low, F64), plan, dy_low.to(F64), epm)
    check_low_precision(run(tri, low, plan, dy_low, epm), naive_same_dtype(low, ids, dy_low, epm), gold, dtype)


@pytest.mark.parametrize("weight_grads", WEIGHT_GRADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(37, 24, 40, 8, (4, 1)), (45, 40, 24, 16, (2, 2))])
def test_tma_path_no_worse_than_naive(case, dtype, weight_grads, monkeypatch):
    """On sm_90+ the GEMMs copy x, dy, W and the outputs by TMA (tensor descriptors): run that path
    (the interpreter executes descriptor loads and stores) with rows and columns past the tiles."""
    num_tokens, k, n, r, epm = case
    force_weight_grads(monkeypatch, WEIGHT_GRADS[weight_grads])
    if not torch.cuda.is_available():
        monkeypatch.setattr(tri, "device_arch", lambda device: 90)
    elif tri.device_arch(torch.device(DEVICE)) < tri.TMA_MIN_ARCH:
        pytest.skip("this GPU has no TMA")
    made = []
    real = tri._tma_descriptors
    monkeypatch.setattr(tri, "_tma_descriptors", lambda *a: made.append(real(*a)) or made[-1])
    t, ids, plan, dy = make_case(num_tokens, k, n, r, epm, seed=2)
    low, dy_low = cast(t, dtype), dy.to(dtype)
    gold = run(reference, cast(low, F64), plan, dy_low.to(F64), epm)
    check_low_precision(run(tri, low, plan, dy_low, epm), naive_same_dtype(low, ids, dy_low, epm), gold, dtype)
    assert len(made) == 2 and all(m is not None for m in made)  # the forward and the dx GEMM
    assert [m[1] for m in made] == [True, False]  # W's rows are the forward's outputs, dx's inputs


def test_zero_tokens_returns_empty_and_zero_grads():
    t, _, plan, dy = make_case(0, 20, 12, 8, (4, 1), separate=True)
    out = run(tri, cast(t, torch.float32), plan, dy, (4, 1))
    assert out[0].shape == (0, 12)
    for name, g in zip(GRAD_NAMES, out[1:]):
        ref = t[name]
        assert g.shape == ref.shape and not g.any(), name


def test_backward_reuses_the_forwards_intermediates():
    """The backward given the forward's (H, gates) equals the one that recomputes them."""
    t, _, plan, dy = make_case(40, 18, 20, 8, (4, 1), separate=True)
    f = cast(t, torch.float32)
    args = routed_lora_cases.backend_args(f, plan, (4, 1))
    y, saved = tri.routed_lora_forward(*args)
    assert saved.rank.shape == (40, 5 * 8) and saved.gates.shape == (40, 5)
    for a, b in zip(tri.routed_lora_backward(dy.float(), *args, ALL_NEEDS, saved=saved),
                    tri.routed_lora_backward(dy.float(), *args, ALL_NEEDS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ids_out_of_range_add_no_adapter():
    """Unchecked ids (sync checks off on CUDA) never address memory: such a token gets the base linear."""
    t, _, plan, dy = make_case(8, 16, 16, 8, (4, 1), ids=[0, 1] * 4)
    f = cast(t, torch.float32)
    bad = plan._replace(modality=torch.tensor([0, 1, 2, -1, 0, 1, 7, 1], dtype=torch.int32, device=DEVICE))
    y, _ = tri.routed_lora_forward(f["x"], f["weight"], f["bias"], None, bad, f["lora_a"], f["lora_b"],
                                   f["router_weight"], RoutedLoraOptions((4, 1), 2.0))
    base = f["x"] @ f["weight"].t() + f["bias"]
    for row in (2, 3, 6):
        torch.testing.assert_close(y[row], base[row])
    assert not torch.allclose(y[0], base[0])


def test_non_contiguous_inputs():
    t, _, plan, dy = make_case(26, 20, 24, 8, (2, 3), separate=True)
    gold = run(reference, t, plan, dy, (2, 3))
    f = cast(t, torch.float32)
    f["x"] = torch.stack([f["x"], torch.zeros_like(f["x"])], -1)[..., 0]    # column stride 2
    f["lora_input"] = f["lora_input"].t().contiguous().t()        # column-major
    f["weight"] = f["weight"].t().contiguous().t()
    f["lora_b"] = f["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)
    f["lora_a"] = f["lora_a"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not any(f[name].is_contiguous() for name in ("x", "lora_input", "weight", "lora_b", "lora_a"))
    check_close(run(tri, f, plan, dy.t().contiguous().t(), (2, 3)), gold, 1e-5, torch.float32)


@pytest.mark.parametrize("needs", [(True,) + (False,) * 6, (False,) * 5 + (True, False),
                                   (False, False, True, True) + (False,) * 3])
def test_only_requested_gradients(needs):
    t, _, plan, dy = make_case(24, 16, 18, 8, (4, 1))
    ours = run(tri, cast(t, torch.float32), plan, dy, (4, 1), needs)
    check_close(ours, run(reference, t, plan, dy, (4, 1), needs), 1e-5, torch.float32)
    assert [g is not None for g in ours[1:]] == [n and t[name] is not None for n, name in zip(needs, GRAD_NAMES)]


def test_public_api_triton_backend_matches_torch_backend():
    t, _, _, dy = make_case(2 * 23, 20, 24, 8, (4, 1))
    ids = torch.randint(0, 2, (2, 23), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        leaves = {name: None if v is None else v.float().requires_grad_() for name, v in t.items()}
        x = leaves["x"].view(2, 23, 20)
        y = mk.modality_lora_linear(x, leaves["weight"], leaves["bias"], ids, leaves["lora_a"], leaves["lora_b"],
                                    leaves["router_weight"], experts_per_modality=(4, 1), scaling=2.0,
                                    backend=backend)
        y.backward(dy.float().view(2, 23, 24))
        results.append([y] + [leaves[name].grad for name in GRAD_NAMES if leaves[name] is not None])
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    t, _, plan, _ = make_case(8, 16, 16, 8, (4, 1))
    def args(d):
        return d["x"], d["weight"], d["bias"], None, plan, d["lora_a"], d["lora_b"], d["router_weight"]
    with pytest.raises(ValueError, match="x: float64"):
        tri.routed_lora_forward(*args(t), RoutedLoraOptions((4, 1), 2.0))
    f = cast(t, torch.float32)
    with pytest.raises(ValueError, match="router_weight"):
        tri.routed_lora_forward(*args({**f, "router_weight": None}), RoutedLoraOptions((4, 1), 2.0))
    with pytest.raises(ValueError, match="rank"):
        wide = cast(make_case(8, 16, 16, 65, (4, 1))[0], torch.float32)
        tri.routed_lora_forward(*args(wide), RoutedLoraOptions((4, 1), 2.0))
    with pytest.raises(ValueError, match="experts_per_modality"):
        big = cast(make_case(8, 16, 16, 8, (17,))[0], torch.float32)
        tri.routed_lora_forward(*args(big)[:4], plan_routing(torch.zeros(8, dtype=torch.int64), 1), *args(big)[5:],
                                RoutedLoraOptions((17,), 2.0))


def test_offsets_past_2_31_elements():
    """Every index times a stride is int64: x, W and dy with a column stride of 2^29, A, B and the
    router with an expert stride of 2^29, so the last column (expert) lies 2^31 elements past the
    first. The views share one buffer, allocated and never written except at their elements (the
    untouched pages are never mapped: a few MiB resident). An int32 offset wraps and reads elsewhere."""
    stride = 1 << 29
    t, _, plan, dy = make_case(33, 5, 5, 8, (4, 1))
    gold = run(reference, t, plan, dy, (4, 1))
    buf = torch.empty(4 * stride + (1 << 16), dtype=torch.float32, device=DEVICE)
    slots = iter(range(0, 1 << 16, 4096))

    def spread(v, big_dim):
        """v copied into buf, dimension big_dim with the big stride, the others packed in a slot."""
        strides, inner = [0] * v.dim(), 1
        for d in reversed(range(v.dim())):
            if d != big_dim:
                strides[d], inner = inner, inner * v.shape[d]
        strides[big_dim] = stride
        return buf.as_strided(v.shape, strides, next(slots)).copy_(v)

    f = cast(t, torch.float32)
    for name, big_dim in (("x", 1), ("weight", 1), ("lora_a", 0), ("lora_b", 0), ("router_weight", 0)):
        f[name] = spread(f[name], big_dim)
    check_close(run(tri, f, plan, spread(dy.float(), 1), (4, 1)), gold, 1e-5, torch.float32)


def test_no_host_sync_and_no_host_copy(monkeypatch):
    """plan_routing and the Triton forward and backward never wait on the device or copy host data
    to it (with sync checks off, the default on CUDA): CUDA-graph capturable, no cache at first use.
    The first call runs outside the check: on a GPU it compiles and autotunes (timing syncs)."""
    from mode_kernels import _validation

    monkeypatch.setattr(_validation, "sync_checks_enabled", lambda device: False)
    t, ids, plan, dy = make_case(40, 18, 20, 8, (4, 1), separate=True)
    f = cast(t, torch.float32)
    run(tri, f, plan, dy.float(), (4, 1))
    with NoHostSync():
        plan = plan_routing(ids, 2)
        out = run(tri, f, plan, dy.float(), (4, 1))
    check_close(out, run(reference, t, plan, dy, (4, 1)), 1e-5, torch.float32)


def test_gemm_autotune_key_holds_every_constexpr(monkeypatch):
    """Every constexpr of the GEMM kernel is either tuned (set by the configs) or in the autotune key,
    so no two specialisations share a tuned config; the token count enters only as its bucket; and
    a key tunes a handful of configs at most."""
    kernel = tri._gemm_kernel
    tuned = {name for config in kernel.configs for name in config.kwargs}
    params = inspect.signature(kernel.fn.fn).parameters.values()
    constexprs = {p.name for p in params if p.annotation in ("tl.constexpr", triton.language.constexpr)}
    assert {"EXT", "HAS_BIAS", "ROUTER_ROWS", "DOT_FP32", "BLOCK_M"} <= constexprs
    assert constexprs - tuned <= set(kernel.keys), sorted(constexprs - tuned - set(kernel.keys))
    assert "T" not in kernel.keys and "t_bucket" in kernel.keys
    assert [tri.t_bucket(n) for n in (1, 16, 17, 64, 65, 128, 129, 8192, 10 ** 6)] == [16, 16, 32, 64, 128, 128,
                                                                                         256, 256, 256]
    monkeypatch.setattr(tri, "INTERPRET", False)  # the compiled code's config lists
    for arch in (80, 90):
        for bucket in (*tri.T_BUCKETS, tri.t_bucket(10 ** 6)):
            for fp32 in (False, True):
                assert 1 <= len(tri.gemm_configs(arch, bucket, fp32)) <= 4


@pytest.mark.parametrize("num_tokens, segments", [(100, 4), (100, 3), (100, 2), (100, 1), (20, 1)],
                         ids=["4_segments", "3_uneven_segments", "2_segments", "1_segment", "tokens_under_a_block"])
def test_fused_weight_grads_segments_match_reference(num_tokens, segments, monkeypatch):
    """The dx GEMM's per-segment partials of dA, dR, dB, summed in one launch: 100 tokens (row blocks
    of 32, the last of 4 tokens) in segments of 1, 1, 2 blocks (3 segments), 2 each, all in one; 20
    tokens in one segment shorter than a block."""
    summed = force_weight_grads(monkeypatch, segments)
    t, _, plan, dy = make_case(num_tokens, 37, 45, 8, (4, 1), seed=4)
    check_close(run(tri, cast(t, torch.float32), plan, dy, (4, 1)), run(reference, t, plan, dy, (4, 1)), 1e-5,
                torch.float32)
    assert summed == [min(segments, tri.max_weight_grad_segments(num_tokens, dy.float()))]  # fewer with 128-row tiles


def test_fused_weight_grads_are_deterministic(monkeypatch):
    """Each partial has one writer and the segments are summed in order: two runs are bit-equal."""
    summed = force_weight_grads(monkeypatch, 3)
    t, _, plan, dy = make_case(100, 37, 45, 8, (4, 1), seed=5)
    low = cast(t, torch.bfloat16)
    first, second = (run(tri, low, plan, dy.to(torch.bfloat16), (4, 1)) for _ in range(2))
    assert summed[0] == min(3, tri.max_weight_grad_segments(100, low["x"]))
    for name, a, b in zip(("y",) + GRAD_NAMES, first, second):
        assert (a is None and b is None) or torch.equal(a, b), name


def test_fused_weight_grads_only_where_the_partials_save_bytes(monkeypatch):
    """plan_weight_grads: at Anole's MLP shapes (T=8192, K and N 4096 and 11008, MoDE's layout, bf16)
    the compiled sm_90 plan (132 SMs, 128 x 128 tiles) is 8 segments for K=4096 (32 column blocks:
    256 programs, 2 waves) and 9 for K=11008 (86 column blocks: 774 programs, 6 waves); none for
    float32, for rank 64 (partials of 325 + 320 rank columns), or at bench.offline's T=2048, K=128,
    N=256, where 16 segments' partials outweigh a read of dy."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    monkeypatch.setattr(tri, "device_arch", lambda device: 90)
    mode, wide = tri.Layout((4, 1), 8, True), tri.Layout((4, 1), 64, True)
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert tri.plan_weight_grads(8192, 4096, 11008, mode, bf16) == 8
    assert tri.plan_weight_grads(8192, 11008, 4096, mode, bf16) == 9
    assert tri.plan_weight_grads(8192, 4096, 11008, mode, fp32) == 0
    assert tri.plan_weight_grads(8192, 4096, 11008, wide, bf16) == 0
    assert tri.plan_weight_grads(2048, 128, 256, mode, bf16) == 0
    assert tri.weight_grad_segments(100, 1, 132, 32) == 4 and tri.weight_grad_segments(8192, 1, 132, 128) == 64
