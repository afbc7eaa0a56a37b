"""The continual-learning trainer (``mode-train``): the CLI (``cli``), its one config (``config``),
the methods it compares (``methods``; the rows they train on: ``rehearsal``; the EWC penalty: ``ewc``),
the loop (``loop``), metrics and reports, the gradient-conflict
probe, torchrun set-up (``distributed``) and resumable checkpoints (``checkpointing``).

Importing this package imports none of them; ``mode.train.main`` is the console script.
"""


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)
