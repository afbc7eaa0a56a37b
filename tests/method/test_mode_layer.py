"""MoDELinear on its own: init, the routed formula, dropout on the adapters only, teacher, merge."""
import math

import naive
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mode
import mode_kernels as mk

K, N, R, EPM = 12, 10, 4, (4, 1)


def _layer(dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = mode.MoDELinear(nn.Linear(K, N, bias=bias), rank=R, alpha=8, experts_per_modality=EPM, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


def _naive(layer, x, modality, u=None):
    """The layer's output from the gold formula (tests/naive.py), in float64."""
    bias = layer.base_layer.bias
    return naive.routed_lora(x.double(), layer.base_layer.weight.double(), None if bias is None else bias.double(),
                             modality, layer.lora_A.double(), layer.lora_B.double(), layer.router.double(), EPM,
                             layer.scaling, None if u is None else u.double())


def test_init_like_peft_and_fresh_layer_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    layer = mode.MoDELinear(base, rank=R, alpha=8, experts_per_modality=EPM)
    assert layer.base_layer is base and not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.shape == (5, R, K) and layer.lora_B.shape == (5, N, R) and layer.router.shape == (5, K)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(K)  # kaiming_uniform_(a=sqrt(5)) on [r, K]
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])  # each expert drawn on its own
    x = torch.randn(3, 7, K)
    torch.testing.assert_close(layer(x, torch.randint(0, 2, (3, 7))), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_naive_formula(bias):
    layer = _layer(bias=bias)
    x = torch.randn(2, 5, K)
    modality = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    expected = _naive(layer, x, modality)
    torch.testing.assert_close(layer(x, modality).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, mk.plan_routing(modality, 2)).double(), expected, rtol=1e-5, atol=1e-5)


def test_dropout_reaches_the_adapters_only():
    layer = _layer(dropout=0.5).train()
    x, modality = torch.randn(4, 6, K), torch.randint(0, 2, (4, 6))
    torch.manual_seed(5)
    y = layer(x, modality)
    torch.manual_seed(5)
    u = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y.double(), _naive(layer, x, modality, u), rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x, modality).double(), _naive(layer, x, modality), rtol=1e-5, atol=1e-5)


def test_gradients_reach_adapters_not_base():
    layer = _layer()
    x = torch.randn(3, K, requires_grad=True)
    layer(x, torch.tensor([0, 1, 0])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.router))
    assert layer.base_layer.weight.grad is None and x.grad is not None


def test_teacher_is_exactly_the_base_layer():
    layer = _layer()
    x = torch.randn(4, K)
    layer.teacher = True
    assert torch.equal(layer(x), layer.base_layer(x))  # no modality needed: no adapter runs


def test_merge_raises_and_says_why():
    with pytest.raises(RuntimeError, match="cannot be merged.*modality"):
        _layer().merge()


def test_bad_input():
    with pytest.raises(ValueError, match="base_layer: expected an nn.Linear"):
        mode.MoDELinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="experts_per_modality"):
        mode.MoDELinear(nn.Linear(K, N), experts_per_modality=(4, 0))
    layer = _layer()
    with pytest.raises(ValueError, match="no modality given"):
        layer(torch.randn(2, K))
    with pytest.raises(ValueError, match="modality: expected shape \\[2\\]"):
        layer(torch.randn(2, K), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in \\[0, 2\\)"):
        layer(torch.randn(2, K), torch.tensor([0, 2]))
