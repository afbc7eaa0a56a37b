"""Drawing images from prompt files with a local model, and saving them (tokens, and PNGs with a decoder).

    generate_images(model, ["prompts/cat.json"], "out/images", spec)                   # tokens (+ PNGs)

Generation calls the decoder and the head weight directly (as ``mode.kd_loss`` does): Chameleon's
forward sets the logits of image codes to the most negative float, which would forbid drawing.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ...families.emu3 import Emu3Tokens
from ...families.emu3 import decode_image as emu3_decode_image
from ...hf.models import continue_sequences, model_device
from ...json_files import read_json
from ...layer import routed_layers
from ...modality import ModalitySpec
from ...model import routing_state
from .evaluation import equal_key_batches
from .loading import vocab_size

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


def image_code_mask(spec: ModalitySpec, vocab: int, device: torch.device) -> Tensor:
    """bool [vocab]: the ids of image codes (the spec's ranges; markers excluded)."""
    ids = torch.arange(vocab, device=device)
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    for lo, hi in spec.image_token_ranges:
        mask |= (ids >= lo) & (ids < hi)
    return mask


def prompt_image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) in latents of an Emu3 prompt file: a JSON object with ``input_ids``,
    ``height`` and ``width`` (``mode-prepare`` writes them)."""
    obj = read_json(path) if Path(path).suffix == ".json" else None
    size = (obj.get("height"), obj.get("width")) if isinstance(obj, dict) else (None, None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"{path}: an Emu3 prompt is a JSON object with input_ids and the image's height and width "
                         "in latents (positive ints), as mode-prepare writes it")
    return size


def _image_prompts(prompt_files: Sequence[PathLike], vocab: int, spec: ModalitySpec,
                   emu3: Emu3Tokens | None) -> tuple[list[list[int]], list[tuple[int, int] | None]]:
    """Each prompt file's ids, ready to continue with image codes, and (Emu3) its image size in latents."""
    prompts, sizes = [], []
    for path in prompt_files:
        ids = load_prompt(path, vocab)
        if emu3 is not None:
            sizes.append(prompt_image_size(path))
            if ids[-1] != emu3.wrapper:
                raise ValueError(f"{path}: an Emu3 image prompt ends with <|image start|> \"h*w\" <|image token|> "
                                 f"(id {emu3.wrapper}), as the processor's return_for_image_generation writes it")
        else:
            sizes.append(None)
            if spec.has_markers and ids[-1] != spec.begin_image:
                ids = ids + [spec.begin_image]
        prompts.append(ids)
    return prompts, sizes


def _image_sampler(allowed: Tensor, temperature: float, generator: torch.Generator,
                   forced: dict[int, int]) -> Callable[[Tensor], Tensor]:
    """A next-token chooser for one image: the token of `forced` at its step (Emu3's row and frame
    markers), else a code sampled at `temperature` among the `allowed` ids."""
    steps = itertools.count()

    def choose(logits: Tensor) -> Tensor:
        step = next(steps)
        if step in forced:
            return torch.full(logits.shape[:1], forced[step], dtype=torch.long, device=logits.device)
        logits = logits.masked_fill(~allowed, float("-inf")) / temperature
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    return choose


def generate_images(model: nn.Module, prompt_files: Sequence[PathLike], out_dir: PathLike,
                    spec: ModalitySpec | None = None, image_tokens: int = 1024, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 8,
                    decode_fn: Callable[[Tensor], Tensor] | None = None,
                    emu3: Emu3Tokens | None = None, pixel_stats: tuple | None = None) -> list[dict]:
    """Draw one image per prompt file and save it under ``out_dir``.

    Chameleon layout (``emu3`` None): each prompt gets the begin-of-image marker appended when the
    spec has markers and the prompt does not end with it; then ``image_tokens`` codes (Anole: 1024)
    are sampled at ``temperature`` from the image-code ids only (every other logit masked), seeded.

    Emu3 layout (``emu3``: its tokens, ``Emu3Tokens.of(model)``): each prompt file holds the
    processor's generation prompt (ending ``<|image start|> "h*w" <|image token|>``) with its
    ``height`` and ``width`` in latents (``prompt_image_size``); h rows of w sampled codes, each
    closed by the end-of-row token, then the end-of-frame token and the end marker (the fixed
    tokens are forced, not sampled). The rows are decoded by the checkpoint's VQ decoder
    (``emu3.decode_image``, un-normalised with ``pixel_stats``) unless ``decode_fn`` is given.

    Writes ``<stem>.image_tokens.json`` (``{"prompt": [...], "image_tokens": [...]}``, vocabulary
    ids) and, with a decoder, ``<stem>.png``: ``decode_fn`` maps the generated ids (LongTensor)
    to pixels (float [3, H, W] or [H, W] in [0, 1]); it is the checkpoint's VQ decoder with its id
    mapping. transformers' Chameleon ships the VQ encoder only (``model.model.vqmodel`` has no
    decoder), so for Chameleon / Anole only the tokens are written unless you supply one.

    Returns per prompt ``{"prompt": path, "tokens": path, "png": path or None}``.
    """
    if spec is None:
        if not routed_layers(model):
            raise ValueError("generate_images: pass spec= (the model has no MoDE config to take it from)")
        spec = routing_state(model).config.modality
    stems = [Path(p).name.rsplit(".", 1)[0] for p in prompt_files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"generate_images: prompt files share a name, their outputs would overwrite each other: "
                         f"{stems}")
    vocab, device = vocab_size(model), model_device(model)
    prompts, sizes = _image_prompts(prompt_files, vocab, spec, emu3)
    if emu3 is None:
        decoders = [decode_fn] * len(prompts)
    else:
        decoders = [decode_fn or functools.partial(emu3_decode_image, model, height=h, width=w,
                                                   **({"stats": pixel_stats} if pixel_stats else {}))
                    for h, w in sizes]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    allowed = image_code_mask(spec, vocab, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    results: list[dict | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch in equal_key_batches([(len(p), size) for p, size in zip(prompts, sizes)], batch_size):
            ids = torch.tensor([prompts[i] for i in batch], device=device)
            size = sizes[batch[0]]
            forced = {} if size is None else emu3.forced_tokens(*size)
            steps = image_tokens if size is None else max(forced) + 1
            codes = continue_sequences(model, ids, steps, _image_sampler(allowed, temperature, generator, forced)).cpu()
            for i, row in zip(batch, codes):
                tokens_path = out_dir / f"{stems[i]}.image_tokens.json"
                tokens_path.write_text(json.dumps({"prompt": prompts[i], "image_tokens": row.tolist()}) + "\n")
                png = None
                if decoders[i] is not None:
                    png = out_dir / f"{stems[i]}.png"
                    save_png(decoders[i](row), png)
                results[i] = {"prompt": str(prompt_files[i]), "tokens": str(tokens_path),
                              "png": None if png is None else str(png)}
    finally:
        model.train(was_training)
    return results


def save_png(pixels: Tensor, path: PathLike) -> None:
    """Save float pixels in [0, 1], [3, H, W] (RGB) or [H, W] (gray), as a PNG."""
    from PIL import Image

    pixels = pixels.detach().float().cpu()
    if pixels.dim() == 3 and pixels.shape[0] == 3:
        pixels = pixels.permute(1, 2, 0)
    elif pixels.dim() != 2:
        raise ValueError(f"decode_fn: expected pixels [3, H, W] or [H, W], got {list(pixels.shape)}")
    Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)
