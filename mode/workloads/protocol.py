"""The interface between the trainer (``mode.train``) and what it trains on."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from ..modality import ModalitySpec

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..train.methods import Method


class Workload(Protocol):
    """A pretrained model, a sequence of understanding tasks, a generation stream, and their evaluations.

    The trainer builds a fresh adapted model per method, trains the tasks in order and calls
    ``evaluate`` after each. Evaluations run on every process (FSDP2 forwards are collectives)
    with the same seeds; rank 0 records them.
    """

    config: TrainConfig
    """The run's config; for each seed of --seeds the trainer sets it to a copy with that ``seed``,
    which seeds the adapters' init (``build``) and the workload's sampling."""
    name: str
    """Shown in results.md and metrics.json: the benchmark's or the checkpoint's name."""
    task_names: list[str]
    """The tasks, in training order."""
    spec: ModalitySpec
    """Which token ids are image tokens (also for text-only methods, whose own spec matches none)."""
    generation_rows: list[Any] | None
    """The generation stream MoDE distils on (rows for ``collate``); None when there is none."""

    def task_rows(self, index: int) -> list[Any]:
        """Training rows of task ``index`` (for ``collate``)."""

    def collate(self, rows: list[Any]) -> dict[str, Tensor]:
        """A batch: ``input_ids`` and ``labels`` (-100 where there is no target), [B, T] each."""

    def build(self, method: Method) -> nn.Module:
        """A fresh copy of the pretrained model with the method's adapters, on the run's device."""

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
