"""Model families (``ModelFamily``, in ``base``): one module per family, found by the checkpoint's
``config.model_type``; any other decoder is a ``SharedVocabulary`` model (image codes in its one
vocabulary, spec from the MoDE config)."""
from __future__ import annotations

from torch import nn

from ..hf.models import hf_model
from .base import ImageHead, ModelFamily, SharedVocabulary
from .chameleon import Chameleon
from .emu3 import Emu3
from .janus import Janus

# by name and alias: the --modality presets; by name: the config.model_type each serves
FAMILIES: dict[str, ModelFamily] = {name: family for family in (Chameleon(), Emu3(), Janus())
                                    for name in (family.name, *family.aliases)}

__all__ = ["FAMILIES", "ImageHead", "ModelFamily", "SharedVocabulary", "family_of"]


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model`` (a Hugging Face model, possibly PEFT-wrapped) by its model type."""
    return FAMILIES.get(getattr(hf_model(model).config, "model_type", None), SharedVocabulary())
