"""Drawing images from prompt files with a local model, and saving them (tokens, and PNGs with a decoder).

    generate_images(model, ["prompts/cat.json"], "out/images", spec)                   # tokens (+ PNGs)

Generation calls the decoder and the head weight directly (as ``mode.kd_loss`` does): Chameleon's
forward sets the logits of image codes to the most negative float, which would forbid drawing.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ...families import ModelFamily, family_of
from ...families.images import load_prompt, save_png
from ...hf.models import continue_sequences, model_device
from ...layer import routed_layers
from ...modality import ModalitySpec
from ...model import routing_state
from .evaluation import equal_key_batches
from .loading import vocab_size

PathLike = str | os.PathLike


def image_code_mask(spec: ModalitySpec, vocab: int, device: torch.device) -> Tensor:
    """bool [vocab]: the ids of image codes (the spec's ranges; markers excluded)."""
    ids = torch.arange(vocab, device=device)
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    for lo, hi in spec.image_token_ranges:
        mask |= (ids >= lo) & (ids < hi)
    return mask


def _image_prompts(model: nn.Module, family: ModelFamily, prompt_files: Sequence[PathLike], vocab: int,
                   spec: ModalitySpec) -> tuple[list[list[int]], list[tuple[int, int] | None]]:
    """Each prompt file's ids, ready to continue with image codes, and its image size in latents
    where the family's layout needs it (``family.image_prompt``)."""
    prompts, sizes = [], []
    for path in prompt_files:
        ids, size = family.image_prompt(model, path, load_prompt(path, vocab), spec)
        prompts.append(ids)
        sizes.append(size)
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
                    family: ModelFamily | None = None, model_dir: PathLike | None = None) -> list[dict]:
    """Draw one image per prompt file and save it under ``out_dir``.

    The layout is ``family``'s (default: ``family_of(model)``). Shared layout (Chameleon / Anole):
    each prompt gets the begin-of-image marker appended when the spec has markers and the prompt
    does not end with it; then ``image_tokens`` codes (Anole: 1024) are sampled at ``temperature``
    from the image-code ids only (every other logit masked), seeded.

    A family's own layout (``family.image_prompt``, ``family.forced_tokens``; Emu3: each prompt file
    holds the processor's generation prompt with the image's ``height`` and ``width`` in latents,
    h rows of w sampled codes, each closed by the end-of-row token, then the end-of-frame token and
    the end marker): the tokens it fixes are forced, not sampled, and the draw ends after the last
    of them. The ids are decoded by ``family.image_decoder`` (Emu3: the checkpoint's VQ decoder,
    un-normalised with ``model_dir``'s image statistics) unless ``decode_fn`` is given.

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
    family = family_of(model) if family is None else family
    prompts, sizes = _image_prompts(model, family, prompt_files, vocab, spec)
    own_decoder = family.image_decoder(model, model_dir)
    decode = (lambda row, size: decode_fn(row)) if decode_fn is not None else own_decoder
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
            forced = family.forced_tokens(model, size)
            steps = max(forced) + 1 if forced else image_tokens
            codes = continue_sequences(model, ids, steps, _image_sampler(allowed, temperature, generator, forced)).cpu()
            for i, row in zip(batch, codes):
                tokens_path = out_dir / f"{stems[i]}.image_tokens.json"
                tokens_path.write_text(json.dumps({"prompt": prompts[i], "image_tokens": row.tolist()}) + "\n")
                png = None
                if decode is not None:
                    png = out_dir / f"{stems[i]}.png"
                    save_png(decode(row, sizes[i]), png)
                results[i] = {"prompt": str(prompt_files[i]), "tokens": str(tokens_path),
                              "png": None if png is None else str(png)}
    finally:
        model.train(was_training)
    return results
