"""MoDE adapters on disk in PEFT's format: adapter_config.json (``peft_type`` "MODE") and
adapter_model.safetensors, the files ``save_pretrained`` of a ``mode.MoDEPeftConfig`` model writes.

``save_adapter`` writes them for ``apply_mode`` models too, and ``load_adapter`` reads them into a
plain Hugging Face model (applying MoDE) or an ``apply_mode`` model; ``peft.PeftModel.from_pretrained``
reads the same directory. Keys, per adapted module (see ``mode.peft``):
    base_model.model.<module>.mode_A [E, r, K]   .mode_B [E, N, r]   .mode_router [E, K]
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter_check import adapted_modules, check_adapter_fits, vocab_size
from .hf.models import hf_model
from .layer import MoDELinear, routed_layers
from .model import apply_mode, routing_state

if TYPE_CHECKING:
    from .peft import MoDEPeftConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved key
# MoDELinear parameter -> its name on disk (that of mode.peft.MoDEPeftLinear)
DISK_NAMES = {"lora_A": "mode_A", "lora_B": "mode_B", "router": "mode_router"}


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _mode_linears(model: nn.Module) -> list[tuple[str, MoDELinear]]:
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoDE layers; use mode.apply_mode or mode.MoDEPeftConfig")
    others = [name for name, layer in layers if not isinstance(layer, MoDELinear)]
    if others:
        raise ValueError(f"{others[0]}: a PEFT MoDE layer outside a PeftModel; save the PeftModel (save_pretrained)")
    return layers


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of an ``apply_mode`` model under their on-disk keys (detached copies)."""
    return {f"{PEFT_KEY_PREFIX}{name}.{disk}": getattr(layer, param).detach().clone()
            for name, layer in _mode_linears(model) for param, disk in DISK_NAMES.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the MoDE adapters of ``model`` (from ``mode.apply_mode``, or a PEFT model of
    ``mode.MoDEPeftConfig``: then its ``save_pretrained``) to the directory ``path``, created if
    needed; the two adapter files in it are replaced."""
    from safetensors.torch import save_file

    from .peft import MoDEPeftConfig

    if _is_peft_model(model):
        model.save_pretrained(str(path))
        return
    tensors = adapter_state_dict(model)
    host = hf_model(model)
    config = MoDEPeftConfig.from_mode_config(routing_state(model).config,
                                             base_model_name_or_path=getattr(host, "name_or_path", None) or None,
                                             adapted_modules=adapted_modules(model), vocab_size=vocab_size(model))
    path = Path(path)
    config.save_pretrained(str(path))
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def save_lora_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write an ``apply_mode`` model that is one plain LoRA per layer, one text expert that every token
    reaches (the trainer's single-LoRA baselines: ``experts_per_modality`` (1, n) and a modality spec that
    marks no token of the vocabulary as image), as a PEFT LoRA adapter in the directory ``path``:
    ``peft.LoraConfig`` in adapter_config.json and ``lora_A`` / ``lora_B`` weights, which PEFT loads alone
    (``PeftModel.from_pretrained``, no ``import mode``). The idle experts are not saved. The text expert's
    function is LoRA's exactly: its router weight is 1 (a single expert), y = W x + b + alpha / r * B A x."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = _mode_linears(model)
    config = routing_state(model).config
    spec, size = config.modality, vocab_size(model)
    if config.experts_per_modality[0] != 1:
        raise ValueError(f"save_lora_adapter: {config.experts_per_modality[0]} text experts, a plain LoRA has one")
    if spec.begin_image is not None or size is None or any(lo < size for lo, _ in spec.image_token_ranges):
        raise ValueError(f"save_lora_adapter: the modality spec {spec} routes tokens to the image expert; a plain "
                         "LoRA routes none")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules),
                      base_model_name_or_path=getattr(hf_model(model), "name_or_path", None) or None)
    tensors = {}
    for name, layer in layers:
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A[0].detach().contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B[0].detach().contiguous()
    path = Path(path)
    lora.save_pretrained(str(path))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter_config(path: str | os.PathLike) -> MoDEPeftConfig:
    """The ``mode.MoDEPeftConfig`` saved in the directory ``path``; ValueError if it holds another
    kind of adapter."""
    from .peft import MODE_PEFT_TYPE, MoDEPeftConfig

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found; is {path} a directory written by mode.save_adapter "
                                    "or save_pretrained?")
    try:
        saved = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / CONFIG_NAME}: not valid JSON: {exc}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(saved).__name__}")
    if saved.get("peft_type") != MODE_PEFT_TYPE.value:
        raise ValueError(f"{path / CONFIG_NAME}: peft_type is {saved.get('peft_type')!r}, not a MoDE adapter "
                         f"({MODE_PEFT_TYPE.value!r}); load it with peft.PeftModel.from_pretrained")
    return MoDEPeftConfig.from_pretrained(str(path))


def load_adapter(model: nn.Module, path: str | os.PathLike, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load a MoDE adapter directory (``save_adapter`` or ``save_pretrained``) into ``model``; returns it.

    ``model``: a Hugging Face model without MoDE layers (MoDE is applied in place with the saved
    settings, adapters float32 on a half-precision base unless ``autocast_adapter_dtype=False``), or
    an ``apply_mode`` model with the same settings. PEFT models load with ``PeftModel.from_pretrained``.
    Raises ValueError naming the first setting, module or key that does not match.
    """
    from safetensors.torch import load_file

    if _is_peft_model(model):
        raise ValueError(f"{type(model).__name__} is a PEFT model: load with PeftModel.from_pretrained(base, path) "
                         "or model.load_adapter(path, adapter_name)")
    saved = read_adapter_config(path)
    if isinstance(saved.target_modules, str) or saved.layers_to_transform is not None or saved.exclude_modules:
        raise ValueError(f"adapter {path}: its target_modules / layers_to_transform / exclude_modules select modules "
                         "apply_mode cannot; load it with peft.PeftModel.from_pretrained")
    saved_config = saved.mode_config(autocast_adapter_dtype)
    # PeftModel.from_pretrained checks the same (mode.peft), before any module is replaced here
    check_adapter_fits(model, adapted_modules(model, saved_config.target_modules), saved.adapted_modules,
                       saved.vocab_size, saved.modality(), f"adapter {path}")
    if not routed_layers(model):
        apply_mode(model, saved_config)
    config = routing_state(model).config
    for setting in ("rank", "alpha", "experts_per_modality", "modality"):
        if getattr(saved_config, setting) != getattr(config, setting):
            raise ValueError(f"adapter {path}: {setting} is {getattr(saved_config, setting)!r}, the model's MoDE "
                             f"config has {getattr(config, setting)!r}")

    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    for key, want in expected.items():
        module = key.removeprefix(PEFT_KEY_PREFIX).rsplit(".", 1)[0]
        if key not in tensors:
            raise ValueError(f"adapter {path}: module {module!r} of the model has no tensor {key!r} in the file")
        if tensors[key].shape != want.shape:
            raise ValueError(f"adapter {path}: module {module!r}: {key!r} has shape {list(tensors[key].shape)}, "
                             f"the model expects {list(want.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"adapter {path}: {extra[0]!r} matches no MoDE module of the model")
    with torch.no_grad():
        for name, layer in _mode_linears(model):
            for param, disk in DISK_NAMES.items():
                getattr(layer, param).copy_(tensors[f"{PEFT_KEY_PREFIX}{name}.{disk}"])
    return model
