"""One timing function for every benchmark case: median/min/max time and peak extra memory.

CUDA: ``triton.testing.do_bench`` (it flushes L2 between runs) and ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, minus what was allocated before the case ran.
CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks) and the torch profiler's
allocation records (peak of the running sum of every allocation and free during one call, in the
order of their time stamps).
"""
from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    min_ms: float
    max_ms: float
    peak_mem_mib: float


@dataclass(frozen=True)
class TimingBudget:
    """How long to sample one case: do_bench's warmup/rep on CUDA, the Timer's minimum on CPU."""
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_min_run_time_s: float = 0.2


def measure(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> Measurement:
    """Time ``fn`` (a closure over its inputs) and measure the extra memory one call needs.

    ``fn`` is called once first so compilation and autotuning stay out of both numbers.
    """
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = _cuda_peak_bytes(fn, device)
        import triton.testing
        times_ms = triton.testing.do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, return_mode="all")
        return Measurement(statistics.median(times_ms), min(times_ms), max(times_ms), peak / 2 ** 20)
    peak = _cpu_peak_bytes(fn)
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    result = timer.blocked_autorange(min_run_time=budget.cpu_min_run_time_s)
    times_ms = [t * 1e3 for t in result.times]
    return Measurement(result.median * 1e3, min(times_ms), max(times_ms), peak / 2 ** 20)


def _cuda_peak_bytes(fn, device) -> int:
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every CPU allocation (+bytes) and free (-bytes) is a "[memory]" record with its own time stamp.
    # (Summing ops' self memory at their start times instead undercounts: a parent op, such as a
    # custom op, starts before the allocations of its children and carries their frees.)
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints start/stop lines to fd 2, which would tear the progress bar."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
