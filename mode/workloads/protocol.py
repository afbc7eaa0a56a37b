"""The interface between the trainer (``mode.train``) and what it trains on: a workload gives the
pretrained model, its data, its evaluation and its options; the trainer applies the methods and owns
the loop, the processes and the schedule.

A workload is found by name (``--benchmark NAME``) in ``mode.workloads.registry``: a
``WorkloadFactory`` says which options it takes (a dataclass whose fields become trainer flags) and
builds the ``Workload``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..modality import ModalitySpec


def field_metadata(text: str, **argparse_options) -> dict:
    """An option's (a config field's) ``metadata``: its help text and any argparse options beyond type and default."""
    return {"help": text, **argparse_options}


class WorkloadError(ValueError):
    """Bad input to a workload (its options, files or data): the trainer reports the message and stops."""


@dataclass(frozen=True)
class RunSettings:
    """What every workload reads of the trainer's config."""
    seed: int  # seeds the workload's sampling; the trainer gives each seed of --seeds in turn
    batch_size: int  # rows per batch, also of evaluations
    eval_size: int  # held-out rows per evaluation
    gen_temperature: float  # sampling temperature of generated images


@dataclass(frozen=True)
class Environment:
    """Where a run happens (not part of its config)."""
    device: torch.device
    cache_dir: str | Path | None  # for a workload's cached pretrained model
    progress: bool  # progress bars
    is_main: Callable[[], bool]  # whether this process writes files and reports (rank 0 under torchrun)
    barrier: Callable[[], None]  # waits for every process (a no-op in one process)


class Workload(Protocol):
    """A pretrained model, a sequence of understanding tasks, a generation stream, and their evaluations.

    The trainer builds a fresh adapted model per method from ``pretrained_model``, trains the tasks in
    order and calls ``evaluate`` after each. Evaluations run on every process (FSDP2 forwards are
    collectives) with the same seeds; rank 0 records them.
    """

    settings: RunSettings
    """The trainer's settings; for each seed of --seeds the trainer sets a copy with that ``seed``."""
    name: str
    """Shown in results.md and metrics.json: the benchmark's or the model's name."""
    task_names: list[str]
    """The tasks, in training order."""
    spec: ModalitySpec
    """Which token ids are image tokens (also for text-only methods, whose own spec matches none)."""
    vocab_size: int
    """Rows of the model's output head."""
    kd_vocab_range: tuple[int, int] | None
    """The ids KD distils on (``mode.MoDEConfig.kd_vocab_range``); None: the spec's image ids."""
    generation_rows: list[Any] | None
    """The generation stream MoDE distils on (rows for ``collate``); None when there is none."""

    def task_rows(self, index: int) -> list[Any]:
        """Training rows of task ``index`` (for ``collate``)."""

    def collate(self, rows: list[Any]) -> dict[str, Tensor]:
        """A batch: ``input_ids`` and ``labels`` (-100 where there is no target), [B, T] each."""

    def pretrained_model(self) -> nn.Module:
        """A fresh copy of the pretrained model, on the CPU or on the run's device (the trainer moves it there
        after adding the method's adapters). The trainer seeds torch's global generator with ``settings.seed``
        just before this call and adds the adapters right after it, so their init follows whatever this call
        draws: draw the same every time."""

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """After a task: ``accs`` (exact match per task, in order), ``answer_nlls`` (teacher-forced
        NLL of the answers per task, nats per token; ``mode.workloads.scoring.answer_nll``),
        optionally ``digit_accs`` (digits: the answer's first word names the digit), ``gen_acc``
        and ``image_nll`` (None where the workload has no such score)."""

    def evaluate_pretrained(self, model: nn.Module) -> dict[str, Any]:
        """The model before any task: at least ``gen_acc`` and ``image_nll``."""

    def summary(self, pretrained: dict[str, Any]) -> str:
        """One sentence on the pretrained model for results.md."""

    def finish(self, model: nn.Module, method_name: str, output: Path) -> dict[str, Any]:
        """After the method's last task: extra JSON-serialisable results (e.g. drawn samples)."""


@dataclass(frozen=True)
class WorkloadFactory:
    """How the trainer finds, configures and builds a workload (``mode.workloads.registry``)."""
    options: type
    """A dataclass of the workload's own options: each field (with its default and its ``metadata["help"]``)
    becomes a field of the trainer's config and a flag; field names are shared by all workloads, so
    prefix them with the workload's name unless they mean the same everywhere."""
    create: Callable[[Any, RunSettings, Environment], Workload]
    """(its options, the trainer's settings, the environment) -> the workload; raises ``WorkloadError``
    on bad input. Import heavy modules inside it: the registry is read on every trainer start."""
    default_lr: float
    """The peak learning rate when --lr is not given."""


def to_device(batch: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """A batch from ``collate`` on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}

