"""Running the trainer under ``torchrun``: process group, data sharding, DDP / FSDP2 wrapping,
rank-0-only small files (resumable checkpoints: ``mode.train.resume``).

Every helper also works in a single process (not under torchrun): rank 0 of a world of 1, no
process group, wrappers return the model unchanged, so the trainer needs no second code path.

    dist_on = distributed.init()                       # reads torchrun's env; gloo on CPU, nccl on CUDA
    model = distributed.wrap_ddp(model)                # or wrap_fsdp2(model) for --fsdp
    local = distributed.shard_batch(global_batch)      # this rank's rows of the global batch
    loss = distributed.global_mean(ce_sum, n_targets)  # mean over the *global* batch, see below
    if distributed.is_main(): ...                      # metrics, plots, logs
    distributed.atomic_write_json(path, metrics)       # rank 0 writes, temp file + rename

Same result as one process: with the same global batch split across ranks (``shard_batch``) and
each rank's loss built with ``global_mean``, DDP's gradient average equals the gradient of the
global-batch loss (up to float summation order). Adapter dropout draws different random numbers
per rank, so the equality holds with dropout 0 only.

Teacher pass and KD: ``mode.teacher_mode`` and ``mode.kd_loss`` look for MoDE layers and the
Hugging Face model; call them with ``unwrap(model)`` (DDP hides the HF model behind
``.module``). Gradients of a forward through the unwrapped module are still averaged by DDP as
long as the step also runs one forward through the DDP wrapper (the task loss) before
``backward`` -- every adapter parameter is used there, so its gradient hook fires once with the
sum of both losses' gradients.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..hf.models import decoder_of

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- process group

def init(backend: str | None = None) -> bool:
    """Join torchrun's process group when launched by torchrun (``RANK``/``WORLD_SIZE`` set);
    else do nothing. Backend: nccl when CUDA is available, gloo otherwise. On CUDA each rank
    uses the GPU ``LOCAL_RANK``. Returns whether this is a distributed run.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (at the end of a distributed run; no-op otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Whether this process writes metrics, plots and logs (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU under nccl / when CUDA exists, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean over ranks of ``tensor`` (in place; returned); the tensor itself in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def agreed_max(value: int) -> int:
    """The largest of every process's ``value`` (each process must call it); ``value`` in one process."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


# ----------------------------------------------------------------------------- data

def shard_rows(rows: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous slice of ``rows`` rows of a global batch (rows as in
    ``torch.tensor_split``: the first ``rows % world`` ranks take one extra row)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if rows < world:
        raise ValueError(f"a global batch of {rows} rows cannot be split over {world} ranks; "
                         f"use a batch size of at least the world size")
    base, extra = divmod(rows, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (rank_ < extra))


def shard_batch(batch: Mapping[str, Any], rank_: int | None = None, world: int | None = None) -> dict:
    """This rank's rows (dim 0) of every tensor of a global batch; other entries are kept.

    Deterministic: every rank builds the same global batch (same seed, same data order) and
    keeps its slice, so the union over ranks is exactly the batch one process would see.
    """
    tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    if not tensors:
        raise ValueError("shard_batch: the batch holds no tensor")
    rows = {v.shape[0] for v in tensors}
    if len(rows) != 1:
        raise ValueError(f"shard_batch: the batch's tensors disagree on their number of rows: {sorted(rows)}")
    part = shard_rows(rows.pop(), rank_, world)
    return {k: v[part] if isinstance(v, Tensor) else v for k, v in batch.items()}


def global_mean(local_sum: Tensor, local_count: int | Tensor) -> Tensor:
    """The rank-local loss whose DDP gradient average is the gradient of the global mean.

    ``local_sum``: the sum of per-target losses on this rank's rows; ``local_count``: the number
    of targets on this rank. DDP averages gradients over W ranks, so each rank contributes
    ``W * local_sum / global_count``; in one process this is ``local_sum / local_count``. Ranks
    may hold different numbers of targets (answers of different lengths): the result is exact.
    """
    count = torch.as_tensor(local_count, dtype=torch.float64, device=local_sum.device).clone()
    if is_distributed():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return local_sum * (world_size() / count.clamp(min=1)).to(local_sum.dtype)


# ----------------------------------------------------------------------------- wrappers

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 wraps in place, so its model is itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel over the trainable (adapter) parameters; the model itself in a
    single process. The model must already be on ``device()``.

    Frozen parameters are not synchronised (DDP skips parameters without requires_grad; the
    initial broadcast from rank 0 makes every rank start from the same weights).
    ``find_unused_parameters`` stays False for MoDE: the experts of one adapted linear are rows
    of one parameter tensor, so an expert that sees no token (the image expert on a text-only
    batch) gets a zero gradient row, not a missing gradient, and every adapter parameter is
    used by every forward. Set it True for adapters outside the forward's graph on some steps.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("wrap_ddp: the model has no trainable parameter; apply adapters (mode.apply_mode) first")
    if not is_distributed():
        return model
    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``get_decoder().layers``)."""
    layers = getattr(decoder_of(unwrap(model)), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__}: its decoder has no `layers` ModuleList to shard")
    return layers


def wrap_fsdp2(model: nn.Module, base_dtype: torch.dtype | None = torch.bfloat16,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every decoder layer. Returns the
    model (its decoder layers are now ``FSDPModule``s).

    Frozen parameters (the base model) are cast to ``base_dtype`` first (bf16 halves their
    memory and all-gather traffic); trainable parameters (adapters) keep their dtype, float32,
    so their gradients, reduce-scatters and AdamW state stay in float32. FSDP2 needs one dtype
    for the trainable parameters of a group only, so no MixedPrecisionPolicy is needed: each
    parameter is all-gathered in its own dtype and the MoDE op mixes bf16 activations and
    float32 adapters.

    The embeddings, final norm and head stay outside FSDP, replicated (frozen, so nothing to
    synchronise): ``mode.kd_loss`` calls the decoder directly and reads the head's weight, which
    a root ``fully_shard`` would leave sharded outside the model's own forward. They cost two
    vocab x hidden matrices per GPU (1 GiB for Anole-7B in bf16) against the sharded layers.
    In a single process the model is cast but not sharded.
    """
    from torch.distributed.fsdp import fully_shard

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("wrap_fsdp2: the model has no trainable parameter; apply adapters (mode.apply_mode) first")
    layers = decoder_layers(model)
    outside = [name for name, p in model.named_parameters()
               if p.requires_grad and not any(p is q for q in layers.parameters())]
    if outside:
        raise ValueError(f"wrap_fsdp2: trainable parameter {outside[0]} lies outside the decoder layers; "
                         "only adapters inside decoder layers are sharded and synchronised")
    if base_dtype is not None:
        with torch.no_grad():
            for param in model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(base_dtype)
    if not is_distributed():
        return model
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    return model


# ----------------------------------------------------------------------------- small files

def atomic_write_text(path: PathLike, text: str) -> None:
    """Rank 0 writes ``text`` to ``path`` through a temporary file and a rename (readers never
    see a partial file); other ranks do nothing."""
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
