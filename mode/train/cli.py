"""``mode-train`` / ``python -m mode.train``: continual fine-tuning of a unified multimodal model on a
sequence of understanding tasks, every method from the same pretrained model.

    mode-train --benchmark digits --methods mode,lora --output runs/digits
    mode-train --model /ckpt/anole-7b-hf --modality chameleon --data a.jsonl,b.jsonl \\
        --eval-data a_test.jsonl,b_test.jsonl --gen-data generation.jsonl --output runs/anole
    mode-train --config run.yaml --lr 1e-4        # a JSON or YAML file of config fields; flags override it
    torchrun --nproc_per_node=8 -m mode.train ... # DDP; --fsdp: FSDP2 (bf16 base on GPUs)

Every field of ``mode.train.config.TrainConfig`` is a flag (``--steps-per-task`` for
``steps_per_task``), with its default shown by ``--help``.

Writes to the output directory (under torchrun: rank 0 only):
    config.json    the run's TrainConfig
    metrics.json   per method and seed (methods.NAME.per_seed): the matrices of exact match,
                   answer NLL and (digits) digit named right, avg_acc, bwt, gen_acc / image_nll
                   after each task (and the gradient-conflict cosines with --probe-conflict);
                   methods.NAME.summary: [mean, standard error] over --seeds of the scalars
    results.md     a comparison table (mean ± se with several seeds) and the matrices per method
    *.png          score matrices, generation quality after each task, generated digits
                   (digits), conflict.png (--probe-conflict)
    images/        --gen-prompts: images/METHOD/PROMPT.image_tokens.json
    adapters/      adapters/METHOD/: each finished method's adapters (mode.save_adapter), loadable
                   with mode.load_adapter
    checkpoint/    the latest state, a torch.distributed.checkpoint directory (after each task
                   and every --checkpoint-every steps); --resume continues from it with any
                   number of processes; resuming is exact (each step's batch and dropout draws
                   are seeded by (seed, task, step))
A directory that holds a checkpoint or results is refused without --resume (continue) or --overwrite
(delete them first). SIGINT (Ctrl-C) or SIGTERM stops after the current step with a checkpoint there,
prints the command that resumes and exits 130 (143); a second signal stops at once (one process).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from ..workloads.help_format import HelpFormatter, docstring_text
from . import distributed, interrupt
from .config import RunError, TrainConfig

# Fields given as one comma-separated string on the command line (a list in a config file), and
# the type of their items.
_COMMA_SEPARATED = {"methods": str, "seeds": int}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, default: Any) -> None:
    options = dict(field.metadata)
    help_text = options.pop("help", "")
    if isinstance(default, bool):
        parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=default,
                            help=help_text, **options)
        return
    if field.name in _COMMA_SEPARATED:
        item = _COMMA_SEPARATED[field.name]
        default = default if isinstance(default, str) else ",".join(map(str, default))
        parser.add_argument(_flag(field.name), default=default, help=help_text, type=lambda text: tuple(
            item(part.strip()) for part in text.split(",") if part.strip()), **options)
        return
    if isinstance(field.default, tuple):  # nargs="*" in the field's metadata
        parser.add_argument(_flag(field.name), default=list(default), help=help_text, **options)
        return
    # the annotation names the type ("float | None"); None defaults are resolved by the config
    kind = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
    parser.add_argument(_flag(field.name), type=kind, default=default, help=help_text, **options)


def read_config_file(path: Path) -> dict:
    """The TrainConfig fields of a JSON or YAML file (by extension), checked by name."""
    try:
        text = path.read_text()
    except OSError as err:
        raise RunError(f"--config {path}: {err.strerror or err}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # a parse error of either format is a bad file, with its message
        raise RunError(f"--config {path}: not valid {path.suffix[1:] or 'JSON'}: {err}") from None
    if not isinstance(values, dict):
        raise RunError(f"--config {path}: expected a mapping of config fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunError(f"--config {path}: unknown field(s) {unknown}; known: {', '.join(sorted(known))}")
    return values


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mode-train", description=docstring_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="directory for metrics, tables, plots, checkpoint")
    parser.add_argument("--config", type=Path, help="JSON or YAML file of config fields (flags override it)")
    config_flags = parser.add_argument_group("run config (TrainConfig; stored in DIR/config.json)")
    for field in dataclasses.fields(TrainConfig):
        _add_field(config_flags, field, defaults[field.name])
    other = parser.add_argument_group("where it runs (not part of the config)")
    other.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="without torchrun (under torchrun: each process's GPU, else the CPU)")
    other.add_argument("--cache-dir", default=None,
                       help="pretrained-model cache (default $MODE_CACHE_DIR, else $XDG_CACHE_HOME/mode-kernels "
                            "or ~/.cache/mode-kernels)")
    other.add_argument("--jobs", type=int, default=1,
                       help="run the method x seed runs in this many worker processes (each with --threads torch "
                            "threads); per-run results equal a serial run's at the same --threads")
    other.add_argument("--threads", type=int, default=None,
                       help="torch threads per process (float sums differ between thread counts; default: torch's "
                            "for one job, the cores shared among the workers for several)")
    other.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    other.add_argument("--overwrite", action="store_true",
                       help="delete the run in DIR (its checkpoint, results, plots, adapters) and start over")
    other.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The run's TrainConfig (defaults < --config file < flags) and the remaining options."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    config_file = pre.parse_known_args(argv)[0].config
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    from_file = read_config_file(config_file) if config_file is not None else {}
    # The default benchmark applies only without --model (resolved after parsing).
    defaults["benchmark"] = None
    defaults.update(from_file)
    args = build_parser(defaults).parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["benchmark"] is None and values["model"] is None:
        values["benchmark"] = TrainConfig.benchmark
    for name, item in (("methods", str), ("seeds", int), ("gen_prompts", str)):
        value = values[name]
        values[name] = tuple(map(item, value.split(",") if isinstance(value, str) else value))
    return TrainConfig(**values), args


def rerun_command(argv: list[str], resume: bool = True) -> str:
    """The command line that continues (``resume``) or restarts the run of ``argv`` (mode-train's arguments):
    as it was launched (mode-train, python -m mode.train, or torchrun on this many processes), without
    --overwrite."""
    if distributed.is_distributed():
        nodes = distributed.world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []),
                    f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', distributed.world_size())}", "-m",
                    "mode.train"]
    elif Path(sys.argv[0]).name == "__main__.py":
        launcher = [sys.executable, "-m", "mode.train"]
    else:
        launcher = ["mode-train"]
    return shlex.join([*launcher, *(a for a in argv if a not in ("--resume", "--overwrite")),
                       *(["--resume"] if resume else [])])


def main(argv: list[str] | None = None) -> int:
    from .loop import run

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, args = parse_args(argv)
        with interrupt.stop_at_safe_points():
            metrics = run(config, args.output, resume=args.resume, device=args.device, cache_dir=args.cache_dir,
                          progress=not args.no_progress, overwrite=args.overwrite, jobs=args.jobs,
                          threads=args.threads)
        if distributed.is_main():
            print((args.output / "results.md").read_text())
    except RunError as err:
        print(f"mode-train: error: {err}", file=sys.stderr)
        return 2
    except interrupt.Interrupted as stop:
        if distributed.is_main():
            kept = (args.output / "checkpoint").exists()
            print(f"mode-train: stopped by {stop.signal_name}; " + (
                f"checkpoint kept in {args.output / 'checkpoint'}; resume with: {rerun_command(argv)}" if kept else
                f"no checkpoint written yet; start again with: {rerun_command(argv, resume=False)}"),
                file=sys.stderr)
        return stop.exit_status
    finally:
        distributed.shutdown()
    return 0 if metrics else 1
