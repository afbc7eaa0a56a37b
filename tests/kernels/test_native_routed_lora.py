"""Native CPU routed LoRA (forward and every gradient) against the float64 gold.

float64 runs the same code in float64 and must match the naive dense formula to 1e-10; float32 must
match to 1e-5 of the largest gold magnitude; bf16/fp16 must be, elementwise, no further from the gold
than the naive dense formula computed in the same dtype, plus tol times the gold's largest magnitude.
The first use compiles the kernels (minutes) into the per-user cache; later runs only import them.
"""
import os

import pytest
import routed_lora_cases
import torch
from routed_lora_cases import F64, GRAD_NAMES, cast, check_close, check_low_precision, make_case, naive_same_dtype, run

import mode_kernels as mk
from mode_kernels import native
from mode_kernels.contract import RoutedLoraNeeds
from mode_kernels.native import routed_lora as nat
from mode_kernels.reference import routed_lora as reference

if os.environ.get("MODE_KERNELS_NATIVE") == "0":
    pytest.skip("MODE_KERNELS_NATIVE=0 switches the native backend off", allow_module_level=True)
native.extension()  # a failed build fails these tests, with the compiler's reason

# (tokens, K, N, r, experts per modality, options): random ids (many short runs), long runs of one
# modality (image spans), an empty modality, one token, no tokens, odd sizes, separate lora_input.
CASES = {
    "text_image_4_1": (37, 24, 40, 8, (4, 1), {}),
    "image_spans": (300, 19, 23, 8, (4, 1), dict(ids=[0] * 100 + [1] * 70 + [0] * 60 + [1] * 70)),
    # long runs (blocks of one modality's experts) between short ones (merged, dense-masked blocks)
    "long_and_short_runs": (190, 21, 26, 4, (2, 3, 1), dict(ids=[2] * 5 + [0] * 40 + [1, 2, 0] * 7 + [1] * 33
                                                                 + [0] * 31 + [2] * 32 + [1] * 4 + [0] * 24)),
    # runs longer than the token passes' spans (128 tokens), a mixed block of alternating and repeated ids
    "runs_over_a_span": (400, 12, 14, 4, (4, 1), dict(ids=[0] * 150 + [1] * 140 + [0, 1] * 10 + [1] * 3 + [0] * 87)),
    "one_one_no_router_no_bias": (21, 19, 33, 4, (1, 1), dict(router=False, bias=False)),
    "one_one_router_ignored": (18, 16, 16, 8, (1, 1), {}),
    "2_3_1_middle_modality_empty": (30, 20, 17, 16, (2, 3, 1), dict(ids=[0, 2] * 15)),
    "separate_lora_input": (29, 21, 18, 8, (4, 1), dict(separate=True, bias=False)),
    "one_token": (1, 17, 9, 8, (4, 1), dict(ids=[0])),
    "zero_tokens": (0, 13, 11, 4, (4, 1), dict(separate=True)),
    "all_image": (20, 18, 20, 4, (3, 1), dict(ids=[1] * 20)),
    "one_modality_three_experts": (19, 5, 3, 2, (3,), {}),
    "rank_6_sixteen_experts": (17, 16, 20, 6, (16,), {}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_float64_matches_naive_gold(case):
    num_tokens, k, n, r, epm, opts = CASES[case]
    t, ids, plan, dy = make_case(num_tokens, k, n, r, epm, **opts)
    check_close(run(nat, t, plan, dy, epm), naive_same_dtype(t, ids, dy, epm), 1e-10)


@pytest.mark.parametrize("case", ["text_image_4_1", "image_spans", "long_and_short_runs",
                                  "2_3_1_middle_modality_empty", "separate_lora_input"])
def test_float32_matches_reference(case):
    num_tokens, k, n, r, epm, opts = CASES[case]
    t, _, plan, dy = make_case(num_tokens, k, n, r, epm, **opts)
    ours = run(nat, cast(t, torch.float32), plan, dy, epm)
    assert all(o is None or o.dtype == torch.float32 for o in ours)
    check_close(ours, run(reference, t, plan, dy, epm), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["text_image_4_1", "long_and_short_runs", "2_3_1_middle_modality_empty",
                                  "separate_lora_input"])
def test_low_precision_no_worse_than_naive(case, dtype):
    num_tokens, k, n, r, epm, opts = CASES[case]
    t, ids, plan, dy = make_case(num_tokens, k, n, r, epm, seed=1, **opts)
    low, dy_low = cast(t, dtype), dy.to(dtype)
    ref = run(reference, cast(low, F64), plan, dy_low.to(F64), epm)
    naive_same = naive_same_dtype(low, ids, dy_low, epm)
    check_low_precision(run(nat, low, plan, dy_low, epm), naive_same, ref, dtype)


@pytest.mark.parametrize("needs", [(True,) + (False,) * 6, (False,) * 5 + (True, False),
                                   (False, True) + (False,) * 5, (False, False, True, True) + (False,) * 3])
def test_only_requested_gradients(needs):
    t, ids, plan, dy = make_case(24, 16, 18, 8, (4, 1), separate=True)
    ours = run(nat, t, plan, dy, (4, 1), needs)
    check_close(ours, run(reference, t, plan, dy, (4, 1), needs), 1e-10)
    assert [g is not None for g in ours[1:]] == [n and t[name] is not None for n, name in zip(needs, GRAD_NAMES)]


def test_non_contiguous_inputs():
    t, _, plan, dy = make_case(26, 20, 24, 8, (2, 3), separate=True)
    ref = run(reference, t, plan, dy, (2, 3))
    f = dict(t)
    f["x"] = torch.stack([f["x"], torch.zeros_like(f["x"])], -1)[..., 0]    # column stride 2
    f["lora_input"] = f["lora_input"].t().contiguous().t()        # column-major
    f["weight"] = f["weight"].t().contiguous().t()
    f["lora_b"] = f["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)
    f["lora_a"] = f["lora_a"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not any(f[name].is_contiguous() for name in ("x", "lora_input", "weight", "lora_b", "lora_a"))
    check_close(run(nat, f, plan, dy.t().contiguous().t(), (2, 3)), ref, 1e-10)


@pytest.mark.parametrize("case", ["text_image_4_1", "long_and_short_runs", "separate_lora_input", "zero_tokens"])
def test_backward_with_the_saved_shrink_equals_recomputing_it(case):
    num_tokens, k, n, r, epm, opts = CASES[case]
    t, _, plan, dy = make_case(num_tokens, k, n, r, epm, **opts)
    args = routed_lora_cases.backend_args(t, plan, epm)
    y, saved = nat.routed_lora_forward(*args)
    assert [s.shape for s in saved] == [s.shape for s in nat.saved_like(t["x"], t["lora_a"], t["router_weight"],
                                                                       args[-1])]
    needs = RoutedLoraNeeds(*(t[name] is not None for name in GRAD_NAMES))
    for with_saved, recomputed in zip(nat.routed_lora_backward(dy, *args, needs, saved=saved),
                                      nat.routed_lora_backward(dy, *args, needs)):
        assert (with_saved is None) == (recomputed is None)
        if recomputed is not None:
            assert torch.equal(with_saved, recomputed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("runs", ["random", "long"])
def test_threads_give_the_same_result(threads, runs):
    ids = None if runs == "random" else [0] * 300 + [1] * 150 + [0] * 10 + [1] * 140
    t, _, plan, dy = make_case(600, 24, 40, 8, (4, 1), separate=True, ids=ids)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run(nat, cast(t, torch.float32), plan, dy, (4, 1))
    finally:
        torch.set_num_threads(before)
    check_close(ours, run(reference, t, plan, dy, (4, 1)), 1e-5)


@pytest.mark.parametrize("runs", ["random", "long"])
def test_public_api_native_matches_torch_and_auto_picks_native(runs):
    """Through the custom op, whose backward reuses the forward's saved shrink. "long": runs of one modality
    long enough to be blocks of their own experts' columns."""
    assert mk.backends.resolve("auto", torch.device("cpu"), "routed_lora") == "native"
    seq = 40
    t, _, _, dy = make_case(2 * seq, 20, 24, 8, (4, 1))
    ids = torch.randint(0, 2, (2, seq), generator=torch.Generator().manual_seed(3))
    if runs == "long":
        ids = torch.tensor([[0] * seq, [0] * 5 + [1] * (seq - 5)])
    results = []
    for backend in ("torch", "native"):
        leaves = {name: None if v is None else v.float().requires_grad_() for name, v in t.items()}
        y = mk.modality_lora_linear(leaves["x"].view(2, seq, 20), leaves["weight"], leaves["bias"], ids,
                                    leaves["lora_a"], leaves["lora_b"], leaves["router_weight"],
                                    experts_per_modality=(4, 1), scaling=2.0, backend=backend)
        y.backward(dy.float().view(2, seq, 24))
        results.append([y] + [leaves[name].grad for name in GRAD_NAMES if leaves[name] is not None])
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_native_backend_rejects_non_cpu_tensors():
    with pytest.raises(RuntimeError, match="native.*CPU"):
        mk.backends.resolve("native", torch.device("meta"), "routed_lora")
