"""CPU timings of the top-k KD loss (issue 25): the fused top-k op with dense student tiles (the path before
the sparse student) against the sparse student, the teacher given as its top k, and the naive top-k loss; the
teacher's selection against a GEMM + torch.topk; and the rates behind ``mode_kernels.kd_cost``'s "CPU core".

    python -m bench.kd_topk [--positions 2048 --hidden 256 --vocab 8192 --topk 256 --rounds 7]

One thread (torch.set_num_threads(1)), native backend, float32, frozen weight, reduction "mean", forward +
backward; each round times every case once, in turn (interleaved), and the medians over rounds are reported
with the load average before and after, since the machine is shared.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

import mode_kernels as mk
from mode_kernels import kd_cost

from .baselines import naive_linear_kd_kl_topk

T = 2.0
RESULTS = Path(__file__).parent / "results"


def _cases(positions: int, hidden: int, vocab: int, k: int) -> dict:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(positions, hidden, generator=g).requires_grad_()
    ht = torch.randn(positions, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5 * 4  # logits of a few units
    top = mk.teacher_topk(ht, w, k, temperature=T, backend="native")

    def fwd_bwd(loss):
        def run():
            hs.grad = None
            loss().backward()
        return run

    def dense_fused():
        with mock.patch.object(kd_cost, "topk_strategy", lambda *a: "dense"):
            return mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=T, topk=k, backend="native")

    logits = torch.empty(positions, vocab)
    return {
        "naive top-k loss (full logits, torch.topk, gather)": fwd_bwd(
            lambda: naive_linear_kd_kl_topk(hs, ht, w, topk=k, temperature=T)),
        "fused top-k, dense student tiles (before)": fwd_bwd(dense_fused),
        "fused top-k, sparse student (now)": fwd_bwd(
            lambda: mk.fused_linear_kd_kl_loss(hs, ht, w, temperature=T, topk=k, backend="native")),
        "given teacher top-k, sparse student": fwd_bwd(
            lambda: mk.fused_linear_kd_kl_loss(hs, None, w, teacher_topk=top, temperature=T, backend="native")),
        "selection: teacher GEMM + torch.topk": lambda: torch.mm(ht, w.t(), out=logits).topk(k, dim=-1),
        "selection: mk.teacher_topk (native)": lambda: mk.teacher_topk(ht, w, k, temperature=T, backend="native"),
        "teacher GEMM alone": lambda: torch.mm(ht, w.t(), out=logits),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = _cases(args.positions, args.hidden, args.vocab, args.topk)
    for run in cases.values():  # warm up (the native build, allocator)
        run()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    naive = med["naive top-k loss (full logits, torch.topk, gather)"]
    before = med["fused top-k, dense student tiles (before)"]
    shape = f"P {args.positions}, H {args.hidden}, V {args.vocab}, k {args.topk}, T {T:g}"
    lines = [f"# Top-k KD loss on CPU ({datetime.date.today()})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
             f"users; torch {torch.__version__}, 1 thread, native backend, float32, frozen weight, forward + "
             f"backward (the selection rows: forward only). {shape}. Medians of {args.rounds} interleaved rounds; "
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min). Measured.", "",
             "| case | median ms | min ms | x naive | x dense fused |", "|---|---:|---:|---:|---:|"]
    for name in cases:
        lines.append(f"| {name} | {med[name]:.1f} | {min(times[name]) * 1e3:.1f} | {med[name] / naive:.3f} | "
                     f"{med[name] / before:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
