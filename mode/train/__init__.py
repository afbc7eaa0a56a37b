"""The continual-learning trainer (``mode-train``): the CLI (``cli``), its one config (``config``: the
trainer's options and every workload's), the methods it compares (``methods``; a workload's model with a
method's adapters: ``adapting``; the rows they train on: ``rehearsal``; the EWC penalty: ``ewc``), the loop
(``loop``), metrics and reports, the gradient-conflict probe, torchrun set-up (``distributed``), resumable
state (``resume``) and each finished method's adapters on disk (``adapter_export``). What it trains on comes
from ``mode.workloads``.

Importing this package imports none of them; ``mode.train.main`` is the console script.
"""


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)
