"""The extension point for a model family: what MoDE needs to know about how a unified multimodal
model (Chameleon, Emu3, Janus...) marks its image tokens, embeds the image-generation stream,
scores image codes and turns them into pixels, and how its processor tokenizes raw records and
its images are drawn after training (what ``mode-prepare`` and the local-model workload ask of
it, without naming families). A new family is a new module implementing
``ModelFamily``, listed in ``mode.families.FAMILIES``.

Records of every family are one list of token ids: the ids the family's ``modality_spec`` reads.
Families with one vocabulary of text and image codes (Chameleon, Emu3) use the model's own ids;
a family whose image codes have their own embedding table and head (Janus) numbers them after the
text vocabulary (code c is id ``text_vocab + c``), so that an id says which table it is from.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from ..hf.models import hf_model
from ..modality import ModalitySpec


@dataclass(frozen=True)
class ImageHead:
    """The linear layer that scores image codes, and what comes before it.

    ``logits = features(hidden) @ weight.T + bias``; ``features`` maps the decoder's final hidden
    states to that layer's input (identity for an LM head), ``vocab_range`` is the [lo, hi) of its
    outputs that are image codes (None: the modality spec's image-code range); its output row r
    scores the record id ``first_id + r``.
    """

    weight: Tensor
    bias: Tensor | None = None
    features: nn.Module = nn.Identity()
    vocab_range: tuple[int, int] | None = None
    first_id: int = 0

    def logits(self, hidden: Tensor) -> Tensor:
        return nn.functional.linear(self.features(hidden), self.weight, self.bias)


class ModelFamily(Protocol):
    """How one model family shows MoDE its images. Implementations are stateless; methods take the
    (Hugging Face or PEFT-wrapped) model."""

    name: str
    """The ``--modality`` preset and the ``config.model_type`` it serves."""
    aliases: tuple[str, ...]
    """Other ``--modality`` names of the family (Chameleon: "anole")."""
    image_logits_masked: bool
    """Whether the model's own forward sets the logits of image codes to the lowest float (Chameleon): task
    labels may then not be image codes, and its training loss leaves those ids out (``masked_logit_ids``)."""
    load_as_image_text_to_text: bool
    """Whether the checkpoint loads through ``AutoModelForImageTextToText`` although transformers also lists a
    causal LM for its type (Emu3: that class has no VQ model)."""

    def masked_logit_ids(self, model: nn.Module) -> Tensor | None:
        """The ids whose logits the model's own forward masks; None where it masks none."""

    def modality_spec(self, model: nn.Module) -> ModalitySpec:
        """Which ids of the family's records are image tokens (read from the checkpoint's config)."""

    def preset_spec(self, model: nn.Module | None, vocabulary_map: dict | None = None) -> ModalitySpec:
        """The spec ``--modality NAME`` names: read from ``model``'s config, or from the checkpoint's
        ``vocabulary_map`` where the family's is there (either may be None where it is not needed)."""

    def record_vocab_size(self, model: nn.Module) -> int:
        """The ids a record may hold: [0, record_vocab_size)."""

    def stream_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                      modality_ids: Tensor | None = None) -> dict[str, Tensor]:
        """The decoder's keyword arguments for a batch of generation-stream records [B, T]
        (caption, then image codes): ``input_ids``, or ``inputs_embeds`` with ``modality_ids``
        where ids are not what the decoder embeds."""

    def image_head(self, model: nn.Module) -> ImageHead:
        """The head that scores the next image code from the decoder's hidden state."""

    def decode_pixels(self, model: nn.Module, codes: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """An image's generated ids (as the image head numbers them; ``size``: (height, width) in
        latents where the layout needs it) -> float pixels [3, H, W] in [0, 1], or None when the
        checkpoint has no VQ decoder."""

    separate_image_stream: bool
    """True where the generation stream's image codes go through their own embeddings and head
    (``stream_inputs``, ``image_head``) rather than the LM's: the image NLL is scored that way."""

    placeholders_in_records: bool
    """True where a task record keeps the processor's image placeholders (the model's forward puts
    the vision tower's features there); else they are replaced by VQ codes and refused if left."""

    def processor_text_options(self) -> dict:
        """Keyword arguments for the processor when it tokenizes text for the family."""

    def image_codes(self, model: nn.Module, pixels: Tensor, batch: dict) -> Tensor:
        """The VQ codes of a processor ``batch``'s images (``pixels``: its pixel values on the model's
        device and dtype), in the order of the processor's placeholders."""

    def tokenize_records(self, model: nn.Module, processor, template: str, records: list) -> list[dict] | None:
        """``mode-prepare``: raw records of one kind (``RawRecord``: ``kind``, ``fields``,
        ``load_image()``) -> token records, where the family tokenizes them its own way; a tensor value
        in a record is written to a sidecar file and replaced by its name. None: the processor's
        placeholders replaced by ``image_codes`` (the shared way)."""

    def generation_prompt(self, processor, caption: str, ratio: str = "1:1", image_area: int | None = None) -> dict:
        """``mode-prepare``'s prompt file for drawing an image of ``caption`` (``input_ids``, and what
        else ``image_prompt`` reads back); ``ratio`` and ``image_area``: the image's shape where the
        family's prompt holds it."""

    def image_prompt(self, model: nn.Module, path: str | Path, ids: list[int],
                     spec: ModalitySpec) -> tuple[list[int], tuple[int, int] | None]:
        """A prompt file's ids (``path``'s) ready to continue with image codes, and the image's
        (height, width) in latents where the layout needs it."""

    def forced_tokens(self, model: nn.Module, size: tuple[int, int] | None) -> dict[int, int]:
        """The tokens the image layout fixes, by step after the prompt (others are sampled codes)."""

    def image_decoder(self, model: nn.Module,
                      model_dir: str | Path | None = None) -> Callable[[Tensor, tuple[int, int] | None], Tensor] | None:
        """The default pixel decoder of generated ids (the ids and the image size -> [3, H, W] in
        [0, 1]), ``model_dir`` the checkpoint (for its image processor's statistics); None: tokens only."""

    def generate_images(self, model: nn.Module, prompt_files: Sequence[str | Path], out_dir: str | Path,
                        temperature: float = 1.0, seed: int = 0) -> list[dict] | None:
        """Draw one image per prompt file with the family's own sampler, written as
        ``generation.generate_images`` writes them; None: the shared sampler (codes from the head the
        decoder's forward scores, ``forced_tokens`` forced)."""


class SharedVocabulary:
    """A decoder whose one vocabulary holds text and image codes, scored by its LM head: what any
    Hugging Face causal LM is to MoDE (the spec comes from the MoDE config)."""

    name = "shared-vocabulary"
    aliases: tuple[str, ...] = ()
    image_logits_masked = False
    load_as_image_text_to_text = False

    separate_image_stream = False
    placeholders_in_records = False

    def processor_text_options(self) -> dict:
        return {}

    def masked_logit_ids(self, model: nn.Module) -> Tensor | None:
        return None

    def image_codes(self, model: nn.Module, pixels: Tensor, batch: dict) -> Tensor:
        return hf_model(model).model.get_image_tokens(pixels)

    def tokenize_records(self, model: nn.Module, processor, template: str, records: list) -> list[dict] | None:
        return None

    def generation_prompt(self, processor, caption: str, ratio: str = "1:1", image_area: int | None = None) -> dict:
        ids = processor(text=[caption], return_tensors="pt", **self.processor_text_options())["input_ids"][0]
        return {"input_ids": ids.tolist()}

    def image_prompt(self, model: nn.Module, path: str | Path, ids: list[int],
                     spec: ModalitySpec) -> tuple[list[int], tuple[int, int] | None]:
        """The prompt, with the begin-of-image marker appended where the spec has markers."""
        if spec.has_markers and ids[-1] != spec.begin_image:
            ids = ids + [spec.begin_image]
        return ids, None

    def forced_tokens(self, model: nn.Module, size: tuple[int, int] | None) -> dict[int, int]:
        return {}

    def image_decoder(self, model: nn.Module,
                      model_dir: str | Path | None = None) -> Callable[[Tensor, tuple[int, int] | None], Tensor] | None:
        return None

    def generate_images(self, model: nn.Module, prompt_files: Sequence[str | Path], out_dir: str | Path,
                        temperature: float = 1.0, seed: int = 0) -> list[dict] | None:
        return None

    def record_vocab_size(self, model: nn.Module) -> int:
        return hf_model(model).get_output_embeddings().weight.shape[0]

    def stream_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                      modality_ids: Tensor | None = None) -> dict[str, Tensor]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids}
        return {k: v for k, v in inputs.items() if v is not None}

    def image_head(self, model: nn.Module) -> ImageHead:
        head = hf_model(model).get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(hf_model(model)).__name__}: expected a linear output head, got {head!r}")
        return ImageHead(head.weight, head.bias)

    @torch.no_grad()
    def decode_pixels(self, model: nn.Module, codes: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        return None
