"""Emu3's image tokens, read from the checkpoint's ``config.vocabulary_map`` (transformers' ``Emu3Config``).

An image in Emu3's sequence layout (``Emu3Processor``; codes of an image of h x w latents):

    <|image start|> "h*w" <|image token|> (c c ... c <|extra_200|>) x h <|extra_201|> <|image end|>

Each row of w codes ends with the end-of-row token ``<|extra_200|>``; ``<|extra_201|>`` ends the
frame. Image codes are the ``<|visual token NNNNNN|>`` ids; the begin and end markers enclose the
rest, so every token of the layout is routed as an image token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..hf.models import hf_model
from ..json_files import read_json
from ..modality import ModalitySpec
from .base import SharedVocabulary

BEGIN, END, WRAPPER, END_OF_ROW, END_OF_FRAME = (
    "<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>")
VISUAL_TOKEN_PREFIX = "<|visual token"


@dataclass(frozen=True)
class Emu3Tokens:
    codes: tuple[int, int]  # [lo, hi) of the visual-token ids
    begin: int
    end: int
    wrapper: int
    end_of_row: int
    end_of_frame: int

    @classmethod
    def from_vocabulary(cls, vocabulary_map: dict | None) -> Emu3Tokens:
        if not vocabulary_map:
            raise ValueError("modality emu3: the checkpoint's config has no vocabulary_map (is it an Emu3 checkpoint?)")
        codes = sorted(v for k, v in vocabulary_map.items() if k.startswith(VISUAL_TOKEN_PREFIX))
        if not codes or codes[-1] - codes[0] + 1 != len(codes):
            raise ValueError("modality emu3: the vocabulary's visual tokens are missing or not one contiguous id range")
        missing = [name for name in (BEGIN, END, WRAPPER, END_OF_ROW, END_OF_FRAME) if name not in vocabulary_map]
        if missing:
            raise ValueError(f"modality emu3: the vocabulary lacks {missing}")
        ids = [vocabulary_map[name] for name in (BEGIN, END, WRAPPER, END_OF_ROW, END_OF_FRAME)]
        return cls((codes[0], codes[-1] + 1), *ids)

    @classmethod
    def of(cls, model: nn.Module) -> Emu3Tokens:
        return cls.from_vocabulary(getattr(hf_model(model).config, "vocabulary_map", None))

    def spec(self) -> ModalitySpec:
        return ModalitySpec(image_token_ranges=(self.codes,), begin_image=self.begin, end_image=self.end)

    def forced_tokens(self, height: int, width: int) -> dict[int, int]:
        """The tokens after the prompt's ``<|image token|>`` that the layout fixes, by step: the
        end of each row, then the end of the frame and the end marker; the other steps are codes."""
        forced = {row * (width + 1) + width: self.end_of_row for row in range(height)}
        frame = height * (width + 1)
        return forced | {frame: self.end_of_frame, frame + 1: self.end}


def prompt_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in latents of an Emu3 prompt file: a JSON object with ``input_ids``,
    ``height`` and ``width`` (``mode-prepare`` writes them)."""
    obj = read_json(path) if Path(path).suffix == ".json" else None
    size = (obj.get("height"), obj.get("width")) if isinstance(obj, dict) else (None, None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"{path}: an Emu3 prompt is a JSON object with input_ids and the image's height and width "
                         "in latents (positive ints), as mode-prepare writes it")
    return size


def pixel_stats(model_dir: str | Path) -> tuple[list[float], list[float]]:
    """(mean, std) the checkpoint's image processor normalises with (``preprocessor_config.json``);
    (0.5, 0.5) per channel without one (pixels in [-1, 1], the VQ decoder's range)."""
    path = Path(model_dir) / "preprocessor_config.json"
    config = read_json(path) if path.is_file() else {}
    return tuple(_per_channel(config.get(key, 0.5)) for key in ("image_mean", "image_std"))


def _per_channel(value: float | list[float]) -> list[float]:
    return [value] * 3 if isinstance(value, (int, float)) else list(value)


@torch.no_grad()
def decode_image(model: nn.Module, tokens: Tensor, height: int, width: int,
                 stats: tuple[list[float], list[float]] = ([0.5] * 3, [0.5] * 3)) -> Tensor:
    """Emu3's generated rows (h * (w + 1) ids, each row ending with its end-of-row token) -> pixels
    [3, 8h, 8w] in [0, 1], through the checkpoint's VQ decoder (what ``Emu3Model.decode_image_tokens``
    does, without its trailing-token convention), then un-normalised with ``stats``."""
    inner = hf_model(model).model
    rows = tokens[: height * (width + 1)].view(1, height, width + 1).to(next(inner.vqmodel.parameters()).device)
    codes = inner.vocabulary_mapping.convert_bpe2img(rows)  # drops the end-of-row column
    pixels = inner.vqmodel.decode(codes)[0].float().cpu()
    mean, std = (torch.tensor(s, dtype=torch.float32).view(3, 1, 1) for s in stats)
    return (pixels * std + mean).clamp(0, 1)


class Emu3(SharedVocabulary):
    """Emu3: its image tokens from the checkpoint's vocabulary map, its rows decoded by its VQ decoder."""

    name = "emu3"
    # its causal-LM class is text only: the VQ encoder and decoder live in the image-text-to-text class
    load_as_image_text_to_text = True

    def modality_spec(self, model: nn.Module) -> ModalitySpec:
        return Emu3Tokens.of(model).spec()

    def decode_pixels(self, model: nn.Module, codes: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        if size is None:
            raise ValueError("emu3: decoding an image needs its (height, width) in latents")
        return decode_image(model, codes, *size)

    def preset_spec(self, model: nn.Module | None, vocabulary_map: dict | None = None) -> ModalitySpec:
        return Emu3Tokens.from_vocabulary(vocabulary_map).spec()

    def image_codes(self, model: nn.Module, pixels: Tensor, batch: dict) -> Tensor:
        return hf_model(model).model.get_image_tokens(pixels, batch["image_sizes"])

    def generation_prompt(self, processor, caption: str, ratio: str = "1:1", image_area: int | None = None) -> dict:
        """The processor's generation prompt (ending ``<|image start|> "h*w" <|image token|>``) and the
        image's height and width in latents."""
        options = {"ratio": ratio, **({"image_area": image_area} if image_area else {})}
        out = processor(text=[caption], return_for_image_generation=True, **options)
        height, width = out["image_sizes"][0]
        return {"input_ids": list(out["input_ids"][0]), "height": int(height), "width": int(width)}

    def image_prompt(self, model: nn.Module, path: str | Path, ids: list[int],
                     spec: ModalitySpec) -> tuple[list[int], tuple[int, int] | None]:
        """The prompt as written (it ends with ``<|image token|>``) and its ``prompt_image_size``."""
        size, wrapper = prompt_image_size(path), Emu3Tokens.of(model).wrapper
        if ids[-1] != wrapper:
            raise ValueError(f"{path}: an Emu3 image prompt ends with <|image start|> \"h*w\" <|image token|> "
                             f"(id {wrapper}), as the processor's return_for_image_generation writes it")
        return ids, size

    def forced_tokens(self, model: nn.Module, size: tuple[int, int] | None) -> dict[int, int]:
        """h rows of w codes, each closed by the end-of-row token, then the end of frame and the end marker."""
        return Emu3Tokens.of(model).forced_tokens(*size)

    def image_decoder(self, model: nn.Module,
                      model_dir: str | Path | None = None) -> Callable[[Tensor, tuple[int, int] | None], Tensor] | None:
        """The checkpoint's VQ decoder, un-normalised with its image processor's ``pixel_stats``."""
        stats = {} if model_dir is None else {"stats": pixel_stats(model_dir)}
        return lambda codes, size: decode_image(model, codes, *size, **stats)
