"""What a training step draws its task batch from: the current task's rows, every task's (joint),
or the current task's with a share of replayed rows of the earlier tasks (replay)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..workloads import Workload
from ..workloads.protocol import to_device
from . import distributed
from .config import TrainConfig
from .methods import ALL_TASKS, REPLAY, Method


@dataclass
class StepRows:
    """The rows of a task's steps: ``rows``, and ``replay`` rows that fill ``replay_share`` of each
    global batch when there are any."""
    rows: list
    replay: list = field(default_factory=list)
    replay_share: float = 0.0

    def draw(self, rng: np.random.Generator, collate: Callable[[list], dict], config: TrainConfig,
             device: torch.device) -> dict:
        """This process's share of a global batch of batch_size rows drawn by ``rng`` (the same draw
        on every process): round(replay_share * batch_size) of them from ``replay``."""
        replayed = round(self.replay_share * config.batch_size) if self.replay else 0
        picked = [self.rows[i] for i in rng.integers(len(self.rows), size=config.batch_size - replayed)]
        if replayed:
            picked += [self.replay[i] for i in rng.integers(len(self.replay), size=replayed)]
        return to_device(distributed.shard_batch(collate(picked)), device)


def replay_buffer(workload: Workload, config: TrainConfig, task_index: int) -> list:
    """replay_size rows of each task before ``task_index``, drawn once per (seed, task) without
    replacement: the same buffer whenever it is rebuilt (a resumed run needs nothing stored)."""
    buffer = []
    for earlier in range(task_index):
        rows = workload.task_rows(earlier)
        rng = np.random.default_rng([config.seed, earlier, 2])
        buffer += [rows[i] for i in rng.choice(len(rows), size=min(config.replay_size, len(rows)), replace=False)]
    return buffer


def step_rows(workload: Workload, method: Method, config: TrainConfig, task_index: int) -> StepRows:
    if method.rows == ALL_TASKS:
        return StepRows([row for index in range(len(workload.task_names)) for row in workload.task_rows(index)])
    if method.rows == REPLAY:
        return StepRows(workload.task_rows(task_index), replay_buffer(workload, config, task_index),
                        config.replay_share)
    return StepRows(workload.task_rows(task_index))
