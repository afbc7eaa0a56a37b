"""The built-in ``digits`` benchmark: a tiny unified model pretrained on scikit-learn's digits
(``model``), its vocabulary and tasks (``data``), its evaluation (``evaluation``, ``generation``),
its options (``options``) and the workload (``workload``), registered as ``WORKLOAD``."""
from __future__ import annotations

from ..protocol import Environment, RunSettings, Workload, WorkloadFactory
from .options import DigitsOptions

DIGITS_LR = 3e-3  # the digits benchmark's tiny model learns each task in 60 steps at this rate


def create(options: DigitsOptions, settings: RunSettings, environment: Environment) -> Workload:
    from .workload import DigitsWorkload

    return DigitsWorkload(options, settings, environment)


WORKLOAD = WorkloadFactory(DigitsOptions, create, default_lr=DIGITS_LR)
