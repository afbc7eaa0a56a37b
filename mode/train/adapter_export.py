"""Each finished method's adapters as a directory loadable with one call: ``DIR/adapters/<method>/``.

    model = mode.load_adapter(base_model, "runs/anole/adapters/mode")
    model = peft.PeftModel.from_pretrained(base_model, "runs/anole/adapters/lora")   # PEFT alone

The trainer's checkpoint holds the adapters of the method in progress only (the next method
replaces them); these directories keep every finished method's, written before the method is
marked done, so a run that stops afterwards, or resumes, loses none.

The single-LoRA baselines (``Method.plain_lora``: lora, lora-kd, lora-matched, joint, replay, ewc) are
written as plain PEFT LoRA adapters (``mode.adapter_io.save_lora_adapter``), the other methods as MoDE
adapters. The format on disk, its writer and its reader are the method's (``mode.adapter_io``); this module
is the trainer's part of the export: where under the run's directory, rank 0 only, FSDP2 shards gathered,
the earlier copy replaced atomically.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from ..adapter_io import save_adapter, save_lora_adapter
from .distributed import barrier, is_main, unwrap

ADAPTERS_DIR = "adapters"


def adapter_dir(output: Path, method_name: str) -> Path:
    return output / ADAPTERS_DIR / method_name


def export_adapters(model: nn.Module, output: Path, method_name: str, plain_lora: bool = False) -> Path:
    """Write ``model``'s adapters to ``DIR/adapters/<method_name>`` with ``mode.save_adapter``, or as a
    plain PEFT LoRA (``plain_lora``, ``save_lora_adapter``) (rank 0; every rank calls it). FSDP2-sharded
    layers are all-gathered for the write (``unshard``: their parameters are then whole tensors) and
    sharded again. Atomic: written to a temporary sibling, then renamed over any earlier copy."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    path = adapter_dir(output, method_name)
    for module in sharded:
        module.unshard()
    try:
        if is_main():
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            (save_lora_adapter if plain_lora else save_adapter)(unwrap(model), tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
    finally:
        for module in sharded:
            module.reshard()
    barrier()
    return path
