"""The teacher's top k over a fixed generation stream, computed once and stored: ``TeacherCache``.

The KD teacher is the frozen model (adapters off) and the stream it is run on is a fixed list of rows, so its
top-k logits are the same at every step, task, method and seed. ``TeacherCache.load_or_build`` computes them
once (``kd_teacher_topk`` over the rows in batches) and stores them as safetensors in a directory, under a
file named by a digest of what they depend on (``TeacherCacheKey``: the model's frozen weights and dtype, the
rows, k, the temperature, the vocabulary slice and whether the logsumexp is kept); any change of the key is
another file, computed afresh. A batch then carries its rows' positions in the stream (``row_ids`` [B], see
``ROW_IDS``) and ``TeacherCache.lookup`` gives its ``mode_kernels.TeacherTopk`` for ``kd_loss(teacher=...)``,
the teacher's forward skipped.

The values are kept as ``kd_teacher_topk`` returns them (float32 logits, the same bits), the ids relative to
the slice in the narrowest integer type that holds them, and only the distilled positions (``kd_positions``):
a loss from the cache equals the loss from the teacher computed on the batch, as long as the teacher's forward
gives a row the same values in any batch (the digits benchmark's rows all have one length).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mode_kernels as mk

from .families import family_of
from .kd import kd_positions, kd_teacher_topk

ROW_IDS = "row_ids"  # a batch's entry: int64 [B], each row's index in the generation stream
_FORMAT = 1  # the file layout's version, part of the key
_SAMPLE = 1 << 16  # elements of a large weight that enter the model's fingerprint


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's frozen weights (names, shapes, dtypes and values; of a tensor over 65536
    elements an evenly strided sample of them, which any other checkpoint or fine-tune changes). Adapters are
    trainable and do not count: every method of a run has the same teacher."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        values = param.detach().reshape(-1)
        if values.numel() > _SAMPLE:
            values = values[:: values.numel() // _SAMPLE][:_SAMPLE]
        digest.update(f"{name}:{list(param.shape)}:{param.dtype}".encode())
        digest.update(values.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rows_fingerprint(rows: Sequence[Any], collate: Callable[[list], Mapping[str, Tensor]]) -> str:
    """A digest of the stream: each row's tensors as ``collate`` makes them alone, in order."""
    digest = hashlib.sha256()
    for row in rows:
        for name, value in sorted(collate([row]).items()):
            if isinstance(value, Tensor):
                digest.update(f"{name}:{list(value.shape)}:{value.dtype}".encode())
                digest.update(value.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherCacheKey:
    """What the cached values depend on; its digest names the file."""
    model: str  # model_fingerprint
    dtype: str  # the dtype the teacher computes in (its head's, or autocast's)
    data: str  # rows_fingerprint
    k: int
    temperature: float
    vocab_range: tuple[int, int]
    logsumexp: bool  # the slice's logsumexp kept (topk_tail needs it)

    def digest(self) -> str:
        text = json.dumps({**asdict(self), "format": _FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def index_dtype(span: int) -> torch.dtype:
    """The narrowest integer type holding 0 .. span - 1 (ids relative to the slice)."""
    return next(d for d in (torch.uint8, torch.int16, torch.int32) if span - 1 <= torch.iinfo(d).max)


@dataclass
class TeacherCache:
    """The teacher's top k of every distilled position of a stream: flat [positions, k] in row order, row r's
    positions at ``offsets[r]:offsets[r + 1]``."""
    indices: Tensor  # [N, k] ids - lo, index_dtype
    logits: Tensor  # [N, k] as kd_teacher_topk gives them
    logsumexp: Tensor | None  # [N]
    offsets: Tensor  # int64 [rows + 1]
    vocab_range: tuple[int, int]
    path: Path
    computed: bool  # computed by this call (False: read from the file)

    @property
    def nbytes(self) -> int:
        """Its size on disk."""
        return self.path.stat().st_size

    @classmethod
    def load_or_build(cls, directory: str | Path, model: nn.Module, rows: Sequence[Any],
                      collate: Callable[[list], Mapping[str, Tensor]], *, k: int, temperature: float,
                      vocab_range: tuple[int, int], logsumexp: bool = False, batch_size: int = 16,
                      device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                      progress: bool = True) -> TeacherCache:
        """The cache of ``model``'s teacher (a model with MoDE layers, its adapters off) over ``rows`` batched
        by ``collate``: read from ``directory`` if its key's file is there, else computed (batches of
        ``batch_size`` rows on ``device``, under autocast to ``autocast_dtype`` if given, else in the caller's
        autocast if one is on, as the training step runs the teacher) and written there atomically (a
        temporary file renamed: concurrent builders leave one whole file)."""
        device = torch.device(device)
        if autocast_dtype is None and torch.is_autocast_enabled(device.type):  # the caller's autocast
            compute_dtype = torch.get_autocast_dtype(device.type)
        else:
            compute_dtype = autocast_dtype or family_of(model).image_head(model).weight.dtype
        key = TeacherCacheKey(model_fingerprint(model), str(compute_dtype),
                              rows_fingerprint(rows, collate), int(k), float(temperature),
                              (int(vocab_range[0]), int(vocab_range[1])), bool(logsumexp))
        path = Path(directory) / f"kd-teacher-{key.digest()}.safetensors"
        if path.exists():
            return cls._read(path, vocab_range)
        autocast = (contextlib.nullcontext() if autocast_dtype is None else
                    torch.autocast(device.type, dtype=autocast_dtype))
        chunks, counts = [], []
        for start in tqdm(range(0, len(rows), batch_size), desc="KD teacher top-k", disable=not progress):
            batch = {name: v.to(device) for name, v in collate(list(rows[start:start + batch_size])).items()}
            with autocast:
                top = kd_teacher_topk(model, batch, k, temperature=temperature, vocab_range=vocab_range,
                                      logsumexp=logsumexp)
            mask = kd_positions(batch)
            counts.append(mask.sum(dim=1).cpu())
            chunks.append((top.indices[mask].cpu(), top.logits[mask].cpu(),
                           None if top.logsumexp is None else top.logsumexp[mask].cpu()))
        lo, hi = vocab_range
        tensors = {"indices": torch.cat([c[0] for c in chunks]).sub_(lo).to(index_dtype(hi - lo)),
                   "logits": torch.cat([c[1] for c in chunks]),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])}
        if logsumexp:
            tensors["logsumexp"] = torch.cat([c[2] for c in chunks])
        _save_atomic(tensors, path, {"key": json.dumps(asdict(key), sort_keys=True)})
        return cls(tensors["indices"], tensors["logits"], tensors.get("logsumexp"), tensors["offsets"],
                   vocab_range, path, computed=True)

    @classmethod
    def _read(cls, path: Path, vocab_range: tuple[int, int]) -> TeacherCache:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tensors["indices"], tensors["logits"], tensors.get("logsumexp"), tensors["offsets"],
                   vocab_range, path, computed=False)

    def lookup(self, batch: Mapping[str, Tensor]) -> mk.TeacherTopk:
        """The teacher's top k of a batch of the stream ([B, T-1, k]) from its ``row_ids``; positions that are
        not distilled hold placeholder values (ids lo .. lo+k-1, logits 0) that the loss's mask drops."""
        if ROW_IDS not in batch:
            raise ValueError(f"batch: expected a {ROW_IDS!r} entry [B] (each row's index in the stream) to look "
                             "the teacher up in its cache")
        mask = kd_positions(batch)
        row_ids = batch[ROW_IDS].cpu()
        counts = self.offsets[row_ids + 1] - self.offsets[row_ids]
        if not torch.equal(counts, mask.sum(dim=1).cpu()):
            raise ValueError("batch: its rows' distilled positions differ from those cached for their row_ids")
        starts = torch.repeat_interleave(self.offsets[row_ids], counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        flat = starts + within
        lo, k = self.vocab_range[0], self.indices.shape[1]
        device = mask.device
        indices = torch.arange(lo, lo + k, device=device).expand(*mask.shape, k).clone()
        indices[mask] = self.indices[flat].to(device, torch.int64) + lo
        logits = torch.zeros(*mask.shape, k, dtype=self.logits.dtype, device=device)
        logits[mask] = self.logits[flat].to(device)
        lse = None
        if self.logsumexp is not None:
            lse = torch.full(mask.shape, math.log(k), dtype=self.logsumexp.dtype, device=device)
            lse[mask] = self.logsumexp[flat].to(device)
        return mk.TeacherTopk(indices, logits, lse)


def _save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
