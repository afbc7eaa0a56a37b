"""The methods a run compares: which adapters each builds and whether it distils.

    mode       4 text LoRA experts + 1 image LoRA, routed by modality, + KD from the frozen model
               on the generation stream
    mode-nokd  the same without KD (ablation)
    lora       one LoRA for all tokens
    moelora    the 4-expert text-style mixture for all tokens (no modality split)

Text-only methods route every token as text: their modality spec's image range lies past the
vocabulary, so no token is an image token and the image expert stays idle (not counted in
``trainable_params``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..activation_checkpointing import enable_gradient_checkpointing
from ..config import MoDEConfig
from ..layer import MoDELinear
from ..modality import ModalitySpec
from ..model import apply_mode

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class Method:
    experts_per_modality: tuple[int, int]  # (text experts, image experts)
    split_modality: bool  # False: every token is routed as text
    kd: bool  # distil the frozen model on the generation stream


METHODS = {
    "mode": Method((4, 1), split_modality=True, kd=True),
    "mode-nokd": Method((4, 1), split_modality=True, kd=False),
    "lora": Method((1, 1), split_modality=False, kd=False),
    "moelora": Method((4, 1), split_modality=False, kd=False),
}


def apply_method(model: nn.Module, method: Method, config: TrainConfig, spec: ModalitySpec, vocab_size: int,
                 kd_vocab_range: tuple[int, int] | None = None) -> nn.Module:
    """``model`` with the method's adapters, in place (their init draws from torch's global generator)."""
    if not method.split_modality:
        spec = ModalitySpec(image_token_ranges=((vocab_size, vocab_size + 1),))  # matches no token
    mode_config = MoDEConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                             experts_per_modality=method.experts_per_modality, modality=spec,
                             kd_temperature=config.kd_temperature, kd_vocab_range=kd_vocab_range,
                             autocast_adapter_dtype=not config.adapters_in_base_dtype)
    model = apply_mode(model, mode_config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def trainable_params(model: nn.Module, method: Method) -> int:
    """Adapter parameters that can receive a gradient under the method's routing: the image
    expert only if tokens reach it, router rows only of a modality with several experts."""
    text, image = method.experts_per_modality
    used_experts = text + image if method.split_modality else text
    routed_modalities = [n for n in ((text, image) if method.split_modality else (text,)) if n > 1]
    total = 0
    for module in model.modules():
        if isinstance(module, MoDELinear):
            k, n, r = module.in_features, module.out_features, module.rank
            total += used_experts * r * (k + n) + sum(routed_modalities) * k
    return total
