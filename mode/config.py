"""MoDEConfig: what apply_mode builds and how kd_loss distils."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mode_kernels._validation import check_experts_per_modality as check_experts

from .modality import NUM_MODALITIES, ModalitySpec

# MoDE adapts the MLP projections of every decoder layer.
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoDEConfig:
    """Settings of Modality-Decoupled Experts on a decoder.

    Attributes:
        rank, alpha: LoRA rank r and alpha of every expert; scaling = alpha / r.
        experts_per_modality: (text experts, image experts); MoDE uses 4 routed text experts and
            one image LoRA. Experts are ordered by modality.
        dropout: dropout on the adapters' input (the frozen path never sees it).
        target_modules: names (last attribute name, as PEFT matches them) of the nn.Linear
            modules to adapt.
        modality: how token ids map to modalities (default: the Chameleon/Anole vocabulary).
        kd_temperature: KD temperature, applied once to both logits (loss scaled by T^2).
        kd_vocab_range: [lo, hi) of the vocabulary KD compares on; None means the modality
            spec's image-code range (it must have exactly one).
        autocast_adapter_dtype: adapters (A, B, router) in float32 on a float16/bfloat16 base, as
            PEFT does by default; False keeps them in the base's dtype.
    """

    rank: int = 8
    alpha: float = 16
    experts_per_modality: tuple[int, ...] = (4, 1)
    dropout: float = 0.05
    target_modules: tuple[str, ...] = MLP_PROJECTIONS
    modality: ModalitySpec = field(default_factory=ModalitySpec.chameleon)
    kd_temperature: float = 2.0
    kd_vocab_range: tuple[int, int] | None = None
    autocast_adapter_dtype: bool = True

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha: expected a number > 0, got {self.alpha!r}")
        self.experts_per_modality = check_experts_per_modality(self.experts_per_modality)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules: expected non-empty module names, got {self.target_modules!r}")
        if isinstance(self.modality, dict):
            self.modality = ModalitySpec(**self.modality)
        if not isinstance(self.modality, ModalitySpec):
            raise ValueError(f"modality: expected a ModalitySpec, got {type(self.modality).__name__}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature: expected a number > 0, got {self.kd_temperature!r}")
        if self.kd_vocab_range is not None:
            self.kd_vocab_range = tuple(int(v) for v in self.kd_vocab_range)
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(f"autocast_adapter_dtype: expected a bool, got {self.autocast_adapter_dtype!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def resolved_kd_vocab_range(self) -> tuple[int, int]:
        """The vocabulary slice KD compares on."""
        if self.kd_vocab_range is not None:
            return self.kd_vocab_range
        ranges = self.modality.image_token_ranges
        if len(ranges) != 1:
            raise ValueError(f"kd_vocab_range: the modality spec has {len(ranges)} image-token ranges, so "
                             "the KD slice is ambiguous; set MoDEConfig.kd_vocab_range")
        return ranges[0]


def check_experts_per_modality(experts_per_modality: Sequence[int]) -> tuple[int, ...]:
    """(text experts, image experts), each an int >= 1."""
    return check_experts(experts_per_modality, NUM_MODALITIES)
