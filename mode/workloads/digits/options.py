"""The digits benchmark's options (flags of the trainer)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import field_metadata
from .data import PRETRAIN_QUESTIONS, TASK_DESIGNS
from .generation import GenerationConfig
from .model import PretrainConfig


@dataclass
class DigitsOptions:
    gen_samples: int = field(default=GenerationConfig.samples_per_digit, metadata=field_metadata(
        "digits: sampled images per digit for gen_acc"))
    pretrain_steps: int = field(default=PretrainConfig.steps, metadata=field_metadata(
        "digits: pretraining steps of the cached model"))
    pretrain_seed: int = field(default=PretrainConfig.seed, metadata=field_metadata(
        "digits: seed of the cached model's pretraining"))
    pretrain_questions: str = field(default=PretrainConfig.questions, metadata=field_metadata(
        "digits: the pretraining's questions about the image: 'one' (what digit is this ?) or 'several' (also "
        "'is this digit prime ?' and 'what is this digit squared ?', each answered in its own format)",
        choices=tuple(PRETRAIN_QUESTIONS)))
    digits_tasks: str = field(default="shared", metadata=field_metadata(
        "digits: the continual tasks' images: the same upright images for every task ('shared'), or each task "
        "its own view of them ('domains': upright, inverted, transposed, thickened; 'marked': upright with a bar "
        "on the top, left, bottom, right border)", choices=tuple(TASK_DESIGNS)))
