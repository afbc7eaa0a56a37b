"""The KD teacher of a run: its top k over the generation stream from the cache (``mode.kd_cache``), computed
once per run before any method trains (and before ``--jobs`` spawns its workers, which then read the file),
or with ``--no-kd-cache`` on each KD batch. Both give ``kd_loss`` the same ``TeacherTopk``."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from mode_kernels.cache import cache_dir as default_cache_dir

from ..kd import kd_teacher_topk, kd_vocab_range
from ..kd_cache import TeacherCache
from ..workloads import Workload
from . import distributed
from .adapting import build_model
from .config import TrainConfig
from .methods import METHODS

CACHE_SUBDIR = "kd-teacher"


def kd_slice(model: nn.Module, workload: Workload) -> tuple[int, int]:
    """The slice every KD method of the run distils on (``mode.kd.kd_vocab_range`` with the workload's real
    spec: a text-only method's own spec matches no token)."""
    return kd_vocab_range(model, workload.spec)


def kd_k(config: TrainConfig, vocab_range: tuple[int, int]) -> int:
    """The teacher's k: --kd-topk, else (0 or unset, or a k past the slice's size) the whole slice."""
    lo, hi = vocab_range
    return min(config.kd_topk or hi - lo, hi - lo)


def load_teacher_cache(workload: Workload, config: TrainConfig, device: torch.device,
                       cache_dir: str | Path | None, progress: bool, report: bool = True) -> TeacherCache | None:
    """The run's teacher cache (rank 0 computes it if needed, the others then read it; ``report``: rank 0 prints
    where it is, its size and whether it was computed); None when no method distils, with --no-kd-cache, or with
    --fsdp (its teacher computes on sharded bf16 weights)."""
    if not any(METHODS[m].kd for m in config.methods) or not config.kd_cache or config.fsdp:
        return None
    directory = Path(cache_dir or default_cache_dir()) / CACHE_SUBDIR

    def load() -> TeacherCache:
        # the teacher is the pretrained model with its adapters off: any KD method's model, any seed
        model = build_model(workload, METHODS["mode"], config, device).eval()
        vocab_range = kd_slice(model, workload)
        return TeacherCache.load_or_build(
            directory, model, workload.generation_rows, workload.collate, k=kd_k(config, vocab_range),
            temperature=config.kd_temperature, vocab_range=vocab_range, logsumexp=config.kd_topk_tail,
            # on the CPU a row's teacher values do not depend on its batch (the digits metrics are tested equal
            # with and without the cache), so larger batches; on GPUs the training step's batch shape
            batch_size=config.batch_size if device.type == "cuda" else max(64, config.batch_size), device=device,
            # the training step's autocast (bf16 on GPUs): the teacher computes in it with or without the cache
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, progress=progress)

    start = time.perf_counter()
    cache = load() if distributed.is_main() else None
    distributed.barrier()
    if cache is None:
        cache = load()
    if distributed.is_main() and report:
        how = "computed" if cache.computed else "reused"
        print(f"mode-train: KD teacher top-{cache.indices.shape[1]} of {len(cache.offsets) - 1} generation rows "
              f"{how} in {time.perf_counter() - start:.1f} s: {cache.path} ({cache.nbytes / 2**20:.1f} MiB on disk)",
              flush=True)
    return cache


def kd_teacher(model: nn.Module, batch: dict, cache: TeacherCache | None, config: TrainConfig,
               vocab_range: tuple[int, int]):
    """The teacher's ``TeacherTopk`` of a KD batch: looked up in the cache, else computed from ``model``
    (unwrapped) with its adapters off."""
    if cache is not None:
        return cache.lookup(batch)
    return kd_teacher_topk(model, batch, kd_k(config, vocab_range), temperature=config.kd_temperature,
                           vocab_range=vocab_range, logsumexp=config.kd_topk_tail)
