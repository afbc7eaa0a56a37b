"""MoDE adapters on disk, PEFT-style: a directory with adapter_config.json and adapter_model.safetensors.

Keys, per adapted module and expert (experts ordered by modality, text first):
    <module>.lora_A.<e>  [r, K]      <module>.lora_B.<e>  [N, r]      <module>.router  [E, K]
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import MoDEConfig
from .layer import MoDELinear
from .model import routed_layers, routing_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "mode-adapter/1"


def _mode_linears(model: nn.Module) -> list[tuple[str, MoDELinear]]:
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoDE layers; use mode.apply_mode first")
    others = [name for name, layer in layers if not isinstance(layer, MoDELinear)]
    if others:
        raise ValueError(f"{others[0]}: not a MoDELinear; adapters built through PEFT are saved with "
                         "save_pretrained / PeftModel.from_pretrained")
    return layers


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` under their on-disk keys (copies, contiguous)."""
    tensors = {}
    for name, layer in _mode_linears(model):
        for e in range(layer.lora_A.shape[0]):
            tensors[f"{name}.lora_A.{e}"] = layer.lora_A[e].detach().clone()
            tensors[f"{name}.lora_B.{e}"] = layer.lora_B[e].detach().clone()
        tensors[f"{name}.router"] = layer.router.detach().clone()
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the MoDE adapters of ``model`` (built by ``mode.apply_mode``) to the directory ``path``
    (created if needed; the two adapter files in it are replaced, as PEFT's save_pretrained does)."""
    from safetensors.torch import save_file

    config = routing_state(model).config
    tensors = adapter_state_dict(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, **config.to_dict()}, indent=2) + "\n")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters written by ``save_adapter`` into ``model`` (already ``apply_mode``d with the same
    config). Raises ValueError naming the first setting, module or key that does not match."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found; is {path} a directory written by mode.save_adapter?")
    saved = json.loads((path / CONFIG_NAME).read_text())
    if saved.pop("format", None) != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME}: not a MoDE adapter config (expected format {FORMAT!r})")
    saved_config = MoDEConfig.from_dict(saved)
    config = routing_state(model).config
    for setting in ("rank", "alpha", "experts_per_modality", "modality"):
        if getattr(saved_config, setting) != getattr(config, setting):
            raise ValueError(f"adapter {path}: {setting} is {getattr(saved_config, setting)!r}, the model's MoDE "
                             f"config has {getattr(config, setting)!r}")

    tensors = load_file(str(path / WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    for key, want in expected.items():
        module = key[: key.rindex(".router")] if key.endswith(".router") else key.rsplit(".", 2)[0]
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
            for e in range(layer.lora_A.shape[0]):
                layer.lora_A[e].copy_(tensors[f"{name}.lora_A.{e}"])
                layer.lora_B[e].copy_(tensors[f"{name}.lora_B.{e}"])
            layer.router.copy_(tensors[f"{name}.router"])
    return model
