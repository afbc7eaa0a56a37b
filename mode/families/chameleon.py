"""Chameleon / Anole: image codes 4..8195 in the one vocabulary, between <racm3:break> and <eoss>.

transformers' Chameleon ships the VQ encoder only (``model.model.vqmodel`` has no decoder), so
no pixels come back from here."""
from __future__ import annotations

from torch import nn

from ..modality import ModalitySpec
from .base import SharedVocabulary


class Chameleon(SharedVocabulary):
    name = "chameleon"

    def processor_text_options(self) -> dict:
        """Chameleon's processor appends its sep token to a prompt unless told it is for completion."""
        return {"return_for_text_completion": True}

    def modality_spec(self, model: nn.Module | None = None) -> ModalitySpec:
        return ModalitySpec.chameleon()

    def preset_spec(self, model: nn.Module | None, vocabulary_map: dict | None = None) -> ModalitySpec:
        return ModalitySpec.chameleon()
