"""The extension point for a model family: what MoDE needs to know about how a unified multimodal
model (Chameleon, Emu3, Janus...) marks its image tokens, embeds the image-generation stream,
scores image codes and turns them into pixels. A new family is a new module implementing
``ModelFamily``, listed in ``mode.families.FAMILIES``.

Records of every family are one list of token ids: the ids the family's ``modality_spec`` reads.
Families with one vocabulary of text and image codes (Chameleon, Emu3) use the model's own ids;
a family whose image codes have their own embedding table and head (Janus) numbers them after the
text vocabulary (code c is id ``text_vocab + c``), so that an id says which table it is from.
"""
from __future__ import annotations

from dataclasses import dataclass
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

    def modality_spec(self, model: nn.Module) -> ModalitySpec:
        """Which ids of the family's records are image tokens (read from the checkpoint's config)."""

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


class SharedVocabulary:
    """A decoder whose one vocabulary holds text and image codes, scored by its LM head: what any
    Hugging Face causal LM is to MoDE (the spec comes from the MoDE config)."""

    name = "shared-vocabulary"

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
