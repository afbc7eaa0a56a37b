"""Chameleon / Anole: image codes 4..8195 in the one vocabulary, between <racm3:break> and <eoss>.

transformers' Chameleon ships the VQ encoder only (``model.model.vqmodel`` has no decoder), so
no pixels come back from here."""
from __future__ import annotations

import torch
from torch import nn

from ..hf.models import hf_model
from ..modality import ModalitySpec
from .base import SharedVocabulary


class Chameleon(SharedVocabulary):
    name = "chameleon"
    aliases = ("anole",)
    # transformers' ChameleonForConditionalGeneration: `logits[:, :, image_tokens] = finfo.min`
    image_logits_masked = True

    def masked_logit_ids(self, model: nn.Module) -> torch.Tensor:
        return torch.as_tensor(hf_model(model).model.vocabulary_mapping.image_tokens, dtype=torch.long)

    def processor_text_options(self) -> dict:
        """Chameleon's processor appends its sep token to a prompt unless told it is for completion."""
        return {"return_for_text_completion": True}

    def modality_spec(self, model: nn.Module | None = None) -> ModalitySpec:
        return ModalitySpec.chameleon()

    def preset_spec(self, model: nn.Module | None, vocabulary_map: dict | None = None) -> ModalitySpec:
        return ModalitySpec.chameleon()
