"""Per-call host overhead of the public ops at tiny shapes (where the maths costs next to nothing).

    OMP_NUM_THREADS=1 python -m bench.overhead [--calls 2000] [--rounds 5] [--filter kd]

Times each public op's forward and forward + backward in thread CPU time (``time.thread_time_ns``: the
other processes on a loaded machine do not count), median of ``calls`` calls per round, median over rounds,
the cases interleaved round by round. Each op is also timed through its backend's functions called directly
("impl": no custom op, no autograd, no checks), so ``public - impl`` is the op layer's per-call cost.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import mode_kernels as mk
from mode_kernels import backends
from mode_kernels.contract import FusedLinearKdKlNeeds, KdOptions, RoutedLoraNeeds, RoutedLoraOptions

TOKENS, K, N, RANK = 64, 16, 16, 4
EXPERTS = (4, 1)
VOCAB = 32


def _routed_lora(backend: str) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    e = sum(EXPERTS)
    x = torch.randn(TOKENS, K, generator=g, requires_grad=True)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    a = torch.randn(e, RANK, K, generator=g, requires_grad=True)
    lb = torch.randn(e, N, RANK, generator=g, requires_grad=True)
    r = torch.randn(e, K, generator=g, requires_grad=True)
    plan = mk.plan_routing(torch.arange(TOKENS) % 2, len(EXPERTS))
    impl = backends.implementation(backend, "routed_lora")
    kw = dict(experts_per_modality=EXPERTS, scaling=2.0, backend=backend)

    def fwd():
        with torch.no_grad():
            return mk.modality_lora_linear(x, w, b, plan, a, lb, r, **kw)

    def fwd_bwd():
        mk.modality_lora_linear(x, w, b, plan, a, lb, r, **kw).sum().backward()

    args = (x.detach(), w, b, None, plan, a.detach(), lb.detach(), r.detach(), RoutedLoraOptions(EXPERTS, 2.0))
    needs = RoutedLoraNeeds(x=True, lora_input=False, weight=False, bias=False, lora_a=True, lora_b=True,
                            router_weight=True)
    grad_y = torch.ones(TOKENS, N)

    def impl_fwd():
        return impl.routed_lora_forward(*args)

    def impl_fwd_bwd():
        _, saved = impl.routed_lora_forward(*args)
        return impl.routed_lora_backward(grad_y, *args, needs, saved)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "impl fwd": impl_fwd, "impl fwd+bwd": impl_fwd_bwd}


def _kd_kl(backend: str) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(TOKENS, VOCAB, generator=g, requires_grad=True)
    t = torch.randn(TOKENS, VOCAB, generator=g)
    impl = backends.implementation(backend, "kd_kl")

    def fwd():
        with torch.no_grad():
            return mk.kd_kl_loss(s, t, temperature=2.0, backend=backend)

    def fwd_bwd():
        mk.kd_kl_loss(s, t, temperature=2.0, backend=backend).backward()

    sd, grad_rows, options = s.detach(), torch.full((TOKENS,), 1.0 / TOKENS), KdOptions(2.0, 0, VOCAB)

    def impl_fwd():
        return impl.kd_kl_forward(sd, t, None, options)

    def impl_fwd_bwd():
        _, lse_s, lse_t = impl.kd_kl_forward(sd, t, None, options)
        return impl.kd_kl_backward(grad_rows, sd, t, None, lse_s, lse_t, options)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "impl fwd": impl_fwd, "impl fwd+bwd": impl_fwd_bwd}


def _fused_linear_kd_kl(backend: str) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(TOKENS, K, generator=g, requires_grad=True)
    ht = torch.randn(TOKENS, K, generator=g)
    w = torch.randn(VOCAB, K, generator=g)
    impl = backends.implementation(backend, "fused_linear_kd_kl")

    def fwd():
        with torch.no_grad():
            return mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0, backend=backend)

    def fwd_bwd():
        mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=2.0, backend=backend).backward()

    hd, row_weight, options = hs.detach(), torch.full((TOKENS,), 1.0 / TOKENS), KdOptions(2.0, 0, VOCAB)

    def impl_fwd():
        return impl.fused_linear_kd_kl(hd, ht, w, None, None, options, row_weight, FusedLinearKdKlNeeds(False, False))

    def impl_fwd_bwd():
        return impl.fused_linear_kd_kl(hd, ht, w, None, None, options, row_weight, FusedLinearKdKlNeeds(True, False))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "impl fwd": impl_fwd, "impl fwd+bwd": impl_fwd_bwd}


OPS = {"routed_lora": _routed_lora, "kd_kl": _kd_kl, "fused_linear_kd_kl": _fused_linear_kd_kl}


def _median_us(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over rounds)")
    parser.add_argument("--backends", nargs="+", default=["torch", "native"])
    parser.add_argument("--filter", default="", help="only ops whose name contains this")
    args = parser.parse_args(argv)
    cases = {}
    for op, build in OPS.items():
        if args.filter not in op:
            continue
        for backend in args.backends:
            for what, fn in build(backend).items():
                fn()  # first call: builds, imports, warms up
                cases[(op, backend, what)] = fn
    samples = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, fn in cases.items():
            samples[key].append(_median_us(fn, args.calls))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), T={TOKENS} K=N={K} r={RANK} "
          f"V={VOCAB}; thread CPU time, median of {args.calls} calls x {args.rounds} rounds (us)")
    print(f"| op | backend | fwd | impl fwd | fwd+bwd | impl fwd+bwd | op layer fwd+bwd |\n|{'---|' * 7}")
    for op in OPS:
        for backend in args.backends:
            if (op, backend, "fwd") not in samples:
                continue
            us = {what: statistics.median(samples[(op, backend, what)])
                  for what in ("fwd", "impl fwd", "fwd+bwd", "impl fwd+bwd")}
            print(f"| {op} | {backend} | {us['fwd']:.0f} | {us['impl fwd']:.0f} | {us['fwd+bwd']:.0f} "
                  f"| {us['impl fwd+bwd']:.0f} | {us['fwd+bwd'] - us['impl fwd+bwd']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
