"""``--jobs N``: the method × seed runs of one ``mode-train`` command in N worker processes.

Each run is what the serial loop would do for that method and seed (``loop.run_method``), in a process of
its own with a fixed torch thread count, so its results equal a serial run's at the same ``--threads``.
The parent loads the workload once first (the digits benchmark pretrains and caches its model there, which
the workers then read) and scores the pretrained model as the serial loop does (the first method's model,
built with the first seed), so every run's ``gen_retention`` has the same reference.

Each unfinished run keeps its own resume state in ``DIR/jobs/LABEL/checkpoint``; the parent's ``DIR/checkpoint``
holds the finished runs' results. ``--resume`` continues both.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from . import distributed
from .config import RunError, TrainConfig


@dataclass(frozen=True)
class Job:
    """One method and seed, and what its worker needs to run it as the serial loop would."""
    config: TrainConfig  # with the job's seed
    method: str
    output: Path
    device: str
    cache_dir: str | None
    threads: int
    pretrained: dict
    label: str

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "jobs" / self.label / "checkpoint"


def default_threads(jobs: int) -> int:
    """Torch threads per worker when --threads is not given: the machine's cores shared among the workers."""
    return max(1, (multiprocessing.cpu_count() or 1) // jobs)


def run_jobs(config: TrainConfig, state: dict, pending: list[tuple[int, str]], output: Path, device: str,
             cache_dir: str | None, jobs: int, threads: int, label: Callable[[str, int], str],
             save_state: Callable[[], None], worker: Callable[[Job], tuple[dict, float]]) -> None:
    """Run the ``pending`` (seed, method) pairs in ``jobs`` worker processes, each by ``worker(job)`` (a
    module-level function: the workers import it); each finished run goes into ``state["done"]`` and
    ``save_state()`` is called, with one line printed per run."""
    if distributed.is_distributed():
        raise RunError("--jobs runs the method × seed runs in processes of its own; under torchrun give --jobs 1")
    todo = [Job(replace(config, seed=seed), name, output, str(device), cache_dir, threads, state["pretrained"],
                label(name, seed)) for seed, name in pending]
    # spawn, not fork: the parent has run torch (its thread pools do not survive a fork)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(worker, job): job for job in todo}
        print(f"mode-train: {len(todo)} run(s) in {min(jobs, len(todo))} worker processes, {threads} torch "
              f"thread(s) each", flush=True)
        finished = 0
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results, seconds = future.result()
                state["done"].setdefault(job.method, {})[str(job.config.seed)] = results
                save_state()
                shutil.rmtree(job.checkpoint_path.parent)  # its results are in the run's state now
                finished += 1
                print(f"mode-train: [{finished}/{len(todo)}] {job.label} done in {seconds:.0f} s "
                      f"(avg acc {results['avg_acc']:.3f})", flush=True)
    # the methods in the config's order, as the serial loop leaves them (results.md and metrics.json list them so)
    state["done"] = {name: state["done"][name] for name in sorted(state["done"], key=list(config.methods).index)}
    with contextlib.suppress(OSError):
        (output / "jobs").rmdir()  # empty once every run has finished

