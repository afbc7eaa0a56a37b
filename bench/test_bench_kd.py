"""Microbenchmarks: KD loss forward + backward from hidden states at small CPU shapes (torch backend)."""
import pytest
import torch

from bench.cases import KD_IMPLS, CaseSkipped, kd_build

CPU = torch.device("cpu")


@pytest.mark.parametrize("impl", [impl for impl, _ in KD_IMPLS])
@pytest.mark.parametrize("vocab", [1026, 4096])
def test_kd_loss(benchmark, impl, vocab):
    benchmark.group = f"KD fwd+bwd P=512 V={vocab} H=256"
    try:
        fn = kd_build(impl, 512, vocab, 256, CPU, torch.float32)()
    except CaseSkipped as exc:
        pytest.skip(str(exc))
    benchmark(fn)
