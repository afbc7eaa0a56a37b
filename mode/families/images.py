"""Prompt files in, images out: what drawing images reads and writes, for every family
(``mode.workloads.hf_model.generation`` and the families that draw their own way)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..json_files import read_json

PathLike = str | os.PathLike


def load_prompt(path: PathLike, vocab_size: int) -> list[int]:
    """Token ids of a prompt file: ``.json`` (a list of ids, or an object with ``input_ids``) or
    ``.pt`` (a 1-D integer tensor or a list of ids)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    if path.suffix == ".json":
        ids = read_json(path)
        if isinstance(ids, dict):
            ids = ids.get("input_ids")
    elif path.suffix == ".pt":
        try:
            ids = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises several types for a damaged or foreign file
            raise ValueError(f"{path}: not a tensor file torch.load reads ({type(exc).__name__}: {exc})") from None
        if isinstance(ids, Tensor):
            ids = ids.tolist() if ids.dim() == 1 and not ids.is_floating_point() else None
    else:
        raise ValueError(f"{path}: expected a .json or .pt prompt file")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: expected a non-empty list of token ids (or a 1-D integer tensor)")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{path}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids



def save_png(pixels: Tensor, path: PathLike) -> None:
    """Save float pixels in [0, 1], [3, H, W] (RGB) or [H, W] (gray), as a PNG."""
    from PIL import Image

    pixels = pixels.detach().float().cpu()
    if pixels.dim() == 3 and pixels.shape[0] == 3:
        pixels = pixels.permute(1, 2, 0)
    elif pixels.dim() != 2:
        raise ValueError(f"decode_fn: expected pixels [3, H, W] or [H, W], got {list(pixels.shape)}")
    Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)
