"""A fresh model of a run: the workload's pretrained model with a method's adapters (``build_model``,
``apply_method``)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import MoDEConfig
from ..gradient_checkpointing import enable_gradient_checkpointing
from ..modality import ModalitySpec
from ..model import apply_mode
from ..workloads import Workload
from .config import TrainConfig
from .methods import Method, matched_lora_rank


def apply_method(model: nn.Module, method: Method, config: TrainConfig, spec: ModalitySpec, vocab_size: int,
                 kd_vocab_range: tuple[int, int] | None = None) -> nn.Module:
    """``model`` with the method's adapters, in place (their init draws from torch's global generator);
    with EWC also its (zero) Fisher and anchor buffers, which checkpoints then carry."""
    if not method.split_modality:
        spec = ModalitySpec(image_token_ranges=((vocab_size, vocab_size + 1),))  # matches no token
    rank, alpha = config.rank, config.alpha
    if method.matched_rank:
        # the same scaling alpha / rank as the other methods' experts: more capacity, not a smaller step
        rank = matched_lora_rank(model, MoDEConfig.target_modules, config.rank)
        alpha = config.alpha * rank / config.rank
    mode_config = MoDEConfig(rank=rank, alpha=alpha, dropout=config.dropout,
                             experts_per_modality=method.experts_per_modality, modality=spec,
                             kd_temperature=config.kd_temperature, kd_vocab_range=kd_vocab_range,
                             autocast_adapter_dtype=not config.adapters_in_base_dtype)
    model = apply_mode(model, mode_config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if method.ewc:
        from .ewc import attach_ewc

        attach_ewc(model)
    return model


def build_model(workload: Workload, method: Method, config: TrainConfig, device: torch.device) -> nn.Module:
    """A fresh copy of the workload's pretrained model with the method's adapters, on ``device``; the
    adapters' init is seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    model = apply_method(workload.pretrained_model(), method, config, workload.spec, workload.vocab_size,
                         workload.kd_vocab_range)
    return model.to(device)
