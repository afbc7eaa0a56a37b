"""A local Hugging Face model directory (``--model``) with pre-tokenized JSONL tasks as a workload: the
tasks (``data``), loading the model (``loading``), its evaluation (``evaluation``, ``generation``), its
options (``options``) and the workload (``workload``), registered as ``WORKLOAD``; ``prepare`` is
``mode-prepare``, which writes the JSONL files."""
from __future__ import annotations

from ..protocol import Environment, RunSettings, Workload, WorkloadFactory
from .options import HFModelOptions

PAPER_LR = 1e-4  # the paper's optimizer for Anole-7B: AdamW, cosine, 10% warmup


def create(options: HFModelOptions, settings: RunSettings, environment: Environment) -> Workload:
    from .workload import HFModelWorkload

    return HFModelWorkload(options, settings, environment)


WORKLOAD = WorkloadFactory(HFModelOptions, create, default_lr=PAPER_LR)
