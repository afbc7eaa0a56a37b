"""Zero positions (tokens) are a valid input of every op on every backend: each returns what its
definition says of an empty sum (a loss of 0, an empty [0, ...] output) and gradients of zero, or
empty where the input is. One table: op x backend x reduction, and, for the losses, zero rows or
rows that are all masked out."""
import pytest
import torch

import mode_kernels as mk

H, V, K, N, R = 8, 11, 6, 5, 2
# Triton's interpreter computes the masked-out lanes of all-masked rows in numpy too (nan, -inf), then drops them
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _routed_lora(backend, rows, _reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, K, generator=g, requires_grad=True)
    lora_a = torch.randn(5, R, K, generator=g, requires_grad=True)
    lora_b = torch.randn(5, N, R, generator=g, requires_grad=True)
    router = torch.randn(5, K, generator=g, requires_grad=True)
    y = mk.modality_lora_linear(x, torch.randn(N, K, generator=g), torch.randn(N, generator=g),
                                torch.zeros(rows, dtype=torch.long), lora_a, lora_b, router,
                                experts_per_modality=(4, 1), scaling=2.0, backend=backend)
    return y, (rows, N), (x, lora_a, lora_b, router)


def _kd_kl(backend, rows, reduction, masked=False):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(rows, V, generator=g, requires_grad=True)
    mask = torch.zeros(rows, dtype=torch.bool) if masked else None
    loss = mk.kd_kl_loss(student, torch.randn(rows, V, generator=g), temperature=2.0, vocab_range=(2, 9), mask=mask,
                         reduction=reduction, backend=backend)
    return loss, (rows,) if reduction == "none" else (), (student,)


def _fused_linear_kd_kl(backend, rows, reduction, masked=False):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(rows, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    mask = torch.zeros(rows, dtype=torch.bool) if masked else None
    loss = mk.fused_linear_kd_kl_loss(hidden, torch.randn(rows, H, generator=g), weight, temperature=2.0,
                                      vocab_range=(2, 9), mask=mask, reduction=reduction, backend=backend)
    return loss, (rows,) if reduction == "none" else (), (hidden, weight)


def _masked(op):
    return lambda backend, rows, reduction: op(backend, rows, reduction, masked=True)


OPS = {"modality_lora_linear": (_routed_lora, [None]),
       "kd_kl_loss": (_kd_kl, ["none", "mean", "sum"]),
       "fused_linear_kd_kl_loss": (_fused_linear_kd_kl, ["none", "mean", "sum"])}
# (op, rows): no positions at all, or positions that are all masked out (the losses' mask)
CASES = [(name, build, 0) for name, (build, _) in OPS.items()] + \
    [(f"{name} (all masked)", _masked(build), 3) for name, (build, _) in OPS.items() if name != "modality_lora_linear"]
TABLE = [pytest.param(build, rows, backend, reduction, id=f"{name}-{backend}-{reduction}")
         for name, build, rows in CASES for backend in ("torch", "native", "triton")
         for reduction in OPS[name.split(" ")[0]][1]]


@pytest.mark.parametrize("build, rows, backend, reduction", TABLE)
def test_empty_input_gives_the_definitions_value_and_zero_gradients(build, rows, backend, reduction):
    out, shape, inputs = build(backend, rows, reduction)
    assert tuple(out.shape) == shape and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # an empty output, or a loss over no position: 0
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    for tensor, grad in zip(inputs, grads):
        assert grad is None or (grad.shape == tensor.shape and torch.count_nonzero(grad) == 0)
