"""The ops call their implementation directly in plain eager mode and their custom op otherwise: same results."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mode_kernels as mk
from mode_kernels.ops import _dispatch, fused_linear_kd_kl, kd_kl, routed_lora


class _RecordOps(TorchDispatchMode):
    """A pass-through dispatch mode that records the name of every op it sees."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _routed_lora_case(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 12, generator=g, requires_grad=True)
    weight, bias = torch.randn(10, 12, generator=g, requires_grad=True), torch.randn(10, generator=g)
    lora_a = torch.randn(5, 4, 12, generator=g, requires_grad=True)
    lora_b = torch.randn(5, 10, 4, generator=g, requires_grad=True)
    router = torch.randn(5, 12, generator=g, requires_grad=True)
    ids = torch.randint(0, 2, (2, 7), generator=g)

    def run():
        return mk.modality_lora_linear(x, weight, bias, ids, lora_a, lora_b, router, experts_per_modality=(4, 1),
                                       scaling=2.0, backend=backend)
    return run, (x, weight, lora_a, lora_b, router), {"mode_kernels::routed_lora", "mode_kernels::routed_lora_backward"}


def _kd_kl_case(backend):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 5, 17, generator=g, requires_grad=True)
    teacher = torch.randn(3, 5, 17, generator=g)

    def run():
        return mk.kd_kl_loss(student, teacher, temperature=2.0, vocab_range=(2, 15), reduction="none",
                             backend=backend)
    return run, (student,), {"mode_kernels::kd_kl", "mode_kernels::kd_kl_backward"}


def _fused_case(reduction):
    def build(backend):
        g = torch.Generator().manual_seed(2)
        hs = torch.randn(3, 5, 8, generator=g, requires_grad=True)
        ht = torch.randn(3, 5, 8, generator=g)
        weight = torch.randn(19, 8, generator=g, requires_grad=True)
        mask = torch.rand(3, 5, generator=g) > 0.3

        def run():
            return mk.fused_linear_kd_kl_loss(hs, ht, weight, temperature=2.0, mask=mask, reduction=reduction,
                                              backend=backend)
        ops = ({"mode_kernels::fused_linear_kd_kl_rows", "mode_kernels::fused_linear_kd_kl_rows_backward"}
               if reduction == "none" else {"mode_kernels::fused_linear_kd_kl_reduced"})
        return run, (hs, weight), ops
    return build


CASES = {"routed_lora": _routed_lora_case, "kd_kl": _kd_kl_case, "fused_mean": _fused_case("mean"),
         "fused_none": _fused_case("none")}


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", CASES)
def test_custom_op_path_matches_the_direct_path(case, backend):
    if backend == "native" and not mk.backends.native_available():
        pytest.skip("native kernels not built")
    run, inputs, custom_ops = CASES[case](backend)

    def values_and_grads():
        out = run()
        grads = torch.autograd.grad((out * torch.linspace(0.5, 2, out.numel()).reshape(out.shape)).sum(), inputs)
        return out, grads

    direct_out, direct_grads = values_and_grads()
    with torch.no_grad():  # the forward alone, without the autograd.Function
        direct_no_grad = run()
    with _RecordOps() as mode:  # a dispatch mode is active: the ops must take their custom op
        op_out, op_grads = values_and_grads()
    assert custom_ops <= mode.names
    torch.testing.assert_close(op_out, direct_out, rtol=0, atol=0)
    torch.testing.assert_close(direct_no_grad, direct_out.detach(), rtol=0, atol=0)
    for a, b in zip(op_grads, direct_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _values_and_grads(run, inputs):
    out = run()
    return out, torch.autograd.grad((out * torch.linspace(0.5, 2, out.numel()).reshape(out.shape)).sum(), inputs)


def _mode_kernels_ops(fn):
    """What fn returns, and the names of the custom ops it ran (the profiler observes; it changes no path)."""
    with torch.profiler.profile() as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("mode_kernels::")}


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", CASES)
def test_without_the_private_torch_functions_every_op_takes_its_custom_op(case, backend, monkeypatch):
    """The fallback when the private functions behind the fast path are missing: same bits, through the custom op."""
    if backend == "native" and not mk.backends.native_available():
        pytest.skip("native kernels not built")
    run, inputs, custom_ops = CASES[case](backend)
    assert _dispatch.FAST_PATH  # on this torch the private functions exist: the fast path is what is compared
    (fast_out, fast_grads), fast_ops = _mode_kernels_ops(lambda: _values_and_grads(run, inputs))
    monkeypatch.setattr(_dispatch, "FAST_PATH", False)
    (slow_out, slow_grads), slow_ops = _mode_kernels_ops(lambda: _values_and_grads(run, inputs))
    assert not fast_ops and custom_ops <= slow_ops
    torch.testing.assert_close(slow_out, fast_out, rtol=0, atol=0)
    for a, b in zip(slow_grads, fast_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", _dispatch._PRIVATE_STATE)
def test_a_missing_or_failing_private_function_turns_the_fast_path_off(name, monkeypatch):
    assert _dispatch._probe_private_state() is not None
    monkeypatch.delattr(torch._C, name)
    assert _dispatch._probe_private_state() is None
    monkeypatch.undo()

    def moved(*args):
        raise RuntimeError("signature changed")
    monkeypatch.setattr(torch._C, name, moved)
    assert _dispatch._probe_private_state() is None


def test_the_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(7, 12, generator=g, requires_grad=True), torch.randn(10, 12, generator=g)
    lora_a = torch.randn(5, 4, 12, generator=g, requires_grad=True)
    lora_b = torch.randn(5, 10, 4, generator=g, requires_grad=True)
    router = torch.randn(5, 12, generator=g, requires_grad=True)
    plan = mk.plan_routing(torch.tensor([0, 1, 1, 0, 0, 1, 0]), 2)
    torch.library.opcheck(routed_lora._routed_lora, (x, weight, None, None, plan.order, plan.offsets, plan.modality,
                                                     lora_a, lora_b, router, [4, 1], 2.0, "torch"))
    s, t = torch.randn(7, 9, generator=g, requires_grad=True), torch.randn(7, 9, generator=g)
    torch.library.opcheck(kd_kl._kd_kl, (s, t, None, 2.0, 1, 8, "torch"))
    hs, ht = torch.randn(7, 6, generator=g, requires_grad=True), torch.randn(7, 6, generator=g)
    head = torch.randn(9, 6, generator=g, requires_grad=True)
    torch.library.opcheck(fused_linear_kd_kl._fused_linear_kd_kl_rows, (hs, ht, head, None, None, None, None, None,
                                                                        2.0, 0, 9, None, False, "torch"))
    top = mk.teacher_topk(ht, head, 4, vocab_range=(1, 8), temperature=2.0, logsumexp=True)
    for backend in ("torch", "native"):  # the given teacher, with the tail bucket; native's sparse student
        torch.library.opcheck(fused_linear_kd_kl._fused_linear_kd_kl_rows, (hs, None, head, None, *top, None, 2.0,
                                                                            1, 8, 4, backend == "torch", backend))
