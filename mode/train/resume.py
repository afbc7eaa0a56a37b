"""Resumable trainer checkpoints: adapters, optimizer state and the trainer's progress in one
``torch.distributed.checkpoint`` (DCP) directory, loadable with any number of processes.

    resume.save_checkpoint(dir, model, optimizer, extra={"step": step})
    state = resume.load_progress(dir, config)     # the trainer's progress, checked against the config
    resume.load_adapters(dir, model, optimizer)   # a damaged checkpoint raises RunError
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..json_files import read_json
from .config import RunError, TrainConfig, config_dict
from .distributed import PathLike, barrier, is_distributed, is_main

EXTRA_STATE_NAME = "trainer_state.json"  # non-tensor state written next to the DCP shards


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    # Adapters only: the frozen base is the pretrained checkpoint, never rewritten.
    options = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> None:
    """Save adapters (+ optimizer state, + JSON-serialisable ``extra`` such as the step or the
    scheduler state) to the directory ``path`` with DCP; every rank must call it.

    DCP stores each tensor by its fully qualified name with its global shape, so the checkpoint
    loads into any world size and either wrapper (or none). Atomic: the shards go to a
    temporary sibling directory that rank 0 renames to ``path`` once every rank has written, so
    an interrupted save leaves the previous checkpoint intact. Needs a file system shared by
    all ranks (as DCP does).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    _dcp(dcp.save, _checkpoint_state(model, optimizer), tmp)
    if is_main():
        (tmp / EXTRA_STATE_NAME).write_text(json.dumps(extra or {}, indent=1) + "\n")
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def _dcp(save_or_load, state: dict, path: PathLike) -> None:
    with warnings.catch_warnings():
        # One process is intended when not distributed; DCP warns about it even when told so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_or_load(state, checkpoint_id=str(path), no_dist=not is_distributed())


def checkpoint_extra(path: PathLike) -> dict:
    """The ``extra`` of a ``save_checkpoint`` directory, without loading tensors (e.g. to know
    whether it holds optimizer state before building the optimizer)."""
    path = Path(path)
    if not (path / EXTRA_STATE_NAME).is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint written by save_checkpoint")
    return read_json(path / EXTRA_STATE_NAME)


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a ``save_checkpoint`` directory into ``model`` (and ``optimizer``: the checkpoint must
    have been saved with one), resharding to this run's world size and wrapper; every rank must
    call it. Returns the saved ``extra``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    extra = checkpoint_extra(path)
    state = _checkpoint_state(model, optimizer)  # the layout (and, for a fresh optimizer, zero state) to fill
    # DCP fails on any adapter or optimizer entry the checkpoint lacks; the frozen base is
    # deliberately absent, hence strict=False when handing the state back to the model.
    _dcp(dcp.load, state, path)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)
    return extra


# ----------------------------------------------------------------------------- the trainer's use

def load_progress(path: Path, config: TrainConfig) -> dict:
    """The trainer state stored with the checkpoint directory ``path`` (no tensors)."""
    try:
        state = checkpoint_extra(path)
        if not isinstance(state, dict) or "config" not in state or "done" not in state:
            raise ValueError("not a mode.train checkpoint")
    except (OSError, ValueError) as err:
        raise corrupt_checkpoint(path, err) from err
    if state["config"] != config_dict(config):
        raise RunError(f"checkpoint {path} was written by a run with another config")
    return state


def load_adapters(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """``load_checkpoint``, with any failure reported as a corrupt checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        load_checkpoint(path, model, optimizer)
    except (Exception, CheckpointException) as err:  # DCP raises several types for damaged shards
        raise corrupt_checkpoint(path, err) from err


# What a run writes into its output directory (``mode.train.cli``'s list; the plots: ``report.write_plots``),
# and all that --overwrite deletes: other files of the directory stay.
RUN_OUTPUTS = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old", "config.json", "metrics.json", "results.md",
               "adapters", "images", "tensorboard", "acc_matrix_*.png", "gen_acc.png", "image_nll.png",
               "generated_digits.png", "loss.png", "conflict.png")


def claim_output(output: Path, config_json: str, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds another run, or this run's checkpoint or results without
    ``resume`` (continue) or ``overwrite`` (delete the run's files, ``RUN_OUTPUTS``, and start over).
    Every process checks (read-only, the same answer), so all refuse together; rank 0 deletes."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                       "--overwrite deletes it")
    config_path = output / "config.json"
    try:
        other = config_path.exists() and read_json(config_path) != json.loads(config_json)
    except ValueError as err:
        raise RunError(f"{err}; it is not a run's config.json: choose another --output, or add --overwrite") from None
    held = [what for what, name in (("a checkpoint", "checkpoint"), ("finished results", "metrics.json"))
            if (output / name).exists()]
    if overwrite:
        if is_main():
            for pattern in RUN_OUTPUTS:
                for path in output.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        barrier()
    elif other:
        raise RunError(f"{output} holds another run (its config.json differs); choose another --output, or add "
                       "--overwrite to delete that run and start this one")
    elif held and not resume:
        raise RunError(f"{output} holds {' and '.join(held)} of this run: add --resume to continue it, or "
                       "--overwrite to delete them and start over")


def corrupt_checkpoint(path: Path, err: BaseException) -> RunError:
    return RunError(f"corrupt checkpoint {path} ({type(err).__name__}: {err}); delete it to start over")
