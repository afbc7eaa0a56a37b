"""The benchmark's naive baselines compute what mode_kernels computes (values and gradients), on CPU.

A baseline that computed something else would make every ratio in the benchmark meaningless.
"""
import pytest
import torch

import mode_kernels as mk
from bench import baselines

ROUTED_BASELINES = [baselines.naive_mode_lora, baselines.peft_loop_lora]


def _routed_inputs(dtype, experts_per_modality, *, lead=(3, 7), k=16, n=24, rank=4, with_lora_input=False,
                   modalities_present=None):
    gen = torch.Generator().manual_seed(0)
    num_modalities, num_experts = len(experts_per_modality), sum(experts_per_modality)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    present = list(range(num_modalities)) if modalities_present is None else modalities_present
    modality = torch.tensor(present)[torch.randint(len(present), lead, generator=gen)]
    inputs = dict(x=rand(*lead, k), weight=rand(n, k), bias=rand(n), modality=modality,
                  lora_a=rand(num_experts, rank, k), lora_b=rand(num_experts, n, rank),
                  router_weight=rand(num_experts, k) if max(experts_per_modality) > 1 else None)
    if with_lora_input:
        inputs["lora_input"] = rand(*lead, k)
    return inputs


def _value_and_grads(fn, inputs, experts_per_modality):
    y = fn(**inputs, experts_per_modality=experts_per_modality, scaling=2.0)
    differentiable = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, differentiable, grad_y))


def _assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("baseline", ROUTED_BASELINES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("experts_per_modality", [(4, 1), (1, 1), (2, 3, 1)])
@pytest.mark.parametrize("with_lora_input", [False, True])
def test_routed_baselines_match_mk_float64(baseline, experts_per_modality, with_lora_input):
    inputs = _routed_inputs(torch.float64, experts_per_modality, with_lora_input=with_lora_input)
    want = _value_and_grads(mk.modality_lora_linear, inputs, experts_per_modality)
    got = _value_and_grads(baseline, inputs, experts_per_modality)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("baseline", ROUTED_BASELINES, ids=lambda f: f.__name__)
def test_routed_baselines_with_an_absent_modality(baseline):
    inputs = _routed_inputs(torch.float64, (4, 1), modalities_present=[0])
    want = _value_and_grads(mk.modality_lora_linear, inputs, (4, 1))
    got = _value_and_grads(baseline, inputs, (4, 1))
    _assert_all_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("experts_per_modality", [(4, 1), (1, 1), (2, 3, 1)])
def test_grouped_mm_baseline_matches_mk(experts_per_modality):
    # torch._grouped_mm has no float64 path; float32 with TF32 irrelevant on CPU.
    reason = baselines.grouped_mm_unavailable_reason(torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    inputs = _routed_inputs(torch.float32, experts_per_modality, with_lora_input=True)
    want = _value_and_grads(mk.modality_lora_linear, inputs, experts_per_modality)
    got = _value_and_grads(baselines.grouped_mm_lora, inputs, experts_per_modality)
    _assert_all_close(got, want, rtol=1e-4, atol=1e-4)


def _kd_inputs(positions=(2, 5), vocab=37, hidden=12):
    gen = torch.Generator().manual_seed(2)
    hs = torch.randn(*positions, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(*positions, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(positions, generator=gen) > 0.3
    return hs, ht, weight, mask


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("vocab_range", [None, (3, 30)])
def test_naive_kd_matches_mk_float64(reduction, with_mask, vocab_range):
    hs, ht, weight, mask = _kd_inputs()
    options = dict(temperature=2.0, mask=mask if with_mask else None, vocab_range=vocab_range, reduction=reduction)
    grad_out = torch.rand(mask.shape if reduction == "none" else (), dtype=torch.float64) + 0.5

    def value_and_grads(loss):
        return [loss] + list(torch.autograd.grad(loss, (hs, weight), grad_out))

    want = value_and_grads(mk.kd_kl_loss(hs @ weight.t(), ht @ weight.t(), **options))
    _assert_all_close(value_and_grads(baselines.naive_kd_kl(hs @ weight.t(), ht @ weight.t(), **options)), want,
                      rtol=1e-10, atol=1e-12)
    _assert_all_close(value_and_grads(baselines.naive_linear_kd_kl(hs, ht, weight, **options)), want,
                      rtol=1e-10, atol=1e-12)
    _assert_all_close(value_and_grads(mk.fused_linear_kd_kl_loss(hs, ht, weight, **options)), want,
                      rtol=1e-10, atol=1e-12)
