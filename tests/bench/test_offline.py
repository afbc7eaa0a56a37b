"""bench.offline counts what a kernel touches: launches, dot FLOPs, unique bytes of masked loads/stores."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("bench.offline counts under Triton's interpreter (no GPU machine)", allow_module_level=True)

import triton.language as tl  # noqa: E402

from bench import offline  # noqa: E402
from mode_kernels import backends  # noqa: E402
from mode_kernels.contract import KdOptions  # noqa: E402


@triton.jit
def _twice_dot(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    a = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :], mask=mask[:, None], other=0.0)
    a = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :], mask=mask[:, None], other=0.0)  # same addresses again
    tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, a, input_precision="ieee"), mask=mask[:, None])


def test_counts_one_launch_its_dot_flops_and_unique_bytes():
    x = torch.randn(16, 16)
    out = torch.zeros(16, 16)
    launches = offline.measure(lambda: _twice_dot[(1,)](x, out, 5, BLOCK=16))
    assert [la.kernel for la in launches] == ["_twice_dot"]
    (launch,) = launches
    assert launch.flops == 2 * 16 * 16 * 16
    assert launch.read_bytes == 5 * 16 * 4     # 5 unmasked rows of float32, read twice, counted once
    assert launch.write_bytes == 5 * 16 * 4
    a = torch.cat([x[:5], torch.zeros(11, 16)])
    torch.testing.assert_close(out[:5], (a @ a)[:5])


def test_counts_torch_kernels_outside_triton_launches():
    x = torch.randn(8, 8)
    launches = offline.measure(lambda: (x @ x).sum())
    assert [la.kernel for la in launches] == ["aten::matmul", "aten::sum"]
    assert launches[0].flops == 2 * 8 * 8 * 8 and launches[0].estimated


def test_routed_lora_decode_is_two_launches_reading_the_weights_about_once():
    (decode,) = [w for w in offline.WORKLOADS if w.op == "routed LoRA decode fwd"]
    row = offline.run_workload(decode)
    assert row["total"]["launches"] == 2
    assert row["ratio"]["bytes"] <= 1.05


def test_fused_kd_counts_the_three_gemm_flops_with_a_frozen_weight():
    """Forward + backward of the fused-linear KD (reduction mean, frozen weight): the two logits
    GEMMs and d hidden, nothing recomputed; at tile-multiple sizes exactly the ideal."""
    run, ideal = offline._kd(128, 512, 64, 0, 512, True)()
    flops = sum(la.flops for la in offline.measure(run))
    assert abs(flops / ideal.flops - 1) <= 0.10, flops / ideal.flops


def test_kd_workloads_cover_the_split_over_the_vocabulary():
    """bench.offline's few-positions KD workloads run the split row pass (partial statistics, merge)."""
    few = [w for w in offline.WORKLOADS if w.op.startswith("kd_kl_loss") and "P=16 " in w.shape]
    assert few
    run, _ = few[0].build()
    kernels = [la.kernel for la in offline.measure(run)]
    assert "_kd_kl_partial_stats_kernel" in kernels and "_kd_kl_merge_kernel" in kernels, kernels


@pytest.mark.parametrize("op", ["fused_linear_kd_kl_loss top-k fwd+bwd",
                                "fused_linear_kd_kl_loss given teacher fwd+bwd"])
def test_topk_kd_is_within_ten_percent_of_its_strategys_ideal(op):
    """Triton's top-k KD on dense tiles: the backend's launches, tensor-core FLOPs and bytes within 10% of the
    ideal of its strategy's passes (the teacher's selection in its GEMM, the student's logits, d hidden; given
    the teacher, the last two), each pass one launch; the API's launches (checks, reduction, autograd) are
    marked as such, outside the backend."""
    (workload,) = [w for w in offline.WORKLOADS if w.op == op]
    row = offline.run_workload(workload)
    for what, ratio in row["ratio"].items():
        assert abs(ratio - 1) <= 0.10, (what, row["ratio"])
    kernels = [la["kernel"] for la in row["launches"] if la["backend"]]
    assert kernels == (["_logits_kernel", "_topk_grad_kernel"] if "given" in op else
                       ["_select_kernel", "_logits_kernel", "_topk_grad_kernel"]), kernels
    api = [la["kernel"] for la in row["launches"] if not la["backend"]]
    assert "aten::ones_like" in api and "aten::sum" in api, api  # autograd's seed, the loss's reduction


def test_launches_outside_a_backend_are_the_apis():
    """Kernels launched inside what ``backends.implementation`` returns are the backend's; others the API's."""
    x = torch.randn(8, 8)

    def run():
        (x + 1).sum()
        backends.implementation("torch", "kd_kl").kd_kl_forward(x, x, None, KdOptions(1.0, 0, 8))

    launches = offline.measure(run)
    assert [(la.kernel, la.backend) for la in launches[:2]] == [("aten::add", False), ("aten::sum", False)]
    assert launches[2:] and all(la.backend for la in launches[2:])

