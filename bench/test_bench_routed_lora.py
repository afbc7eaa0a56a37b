"""Microbenchmarks: routed LoRA forward + backward at small CPU shapes, ours (torch backend) and baselines."""
import pytest
import torch

from bench.cases import ROUTED_LORA_IMPLS, CaseSkipped, routed_lora_build

CPU = torch.device("cpu")


@pytest.mark.parametrize("impl", [impl for impl, _ in ROUTED_LORA_IMPLS])
@pytest.mark.parametrize("k,n", [(256, 688), (688, 256)], ids=["up", "down"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_routed_lora(benchmark, impl, k, n, direction):
    benchmark.group = f"routed LoRA {direction} K={k} N={n} T=512 img=30% r=8"
    try:
        fn = routed_lora_build(impl, k, n, 512, 0.3, 64, 8, direction, CPU, torch.float32)()
    except CaseSkipped as exc:
        pytest.skip(str(exc))
    benchmark(fn)
