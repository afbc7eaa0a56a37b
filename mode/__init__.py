"""MoDE (Modality-Decoupled Experts) on Hugging Face decoders.

    import mode
    cfg = mode.MoDEConfig(modality=mode.ModalitySpec.chameleon())
    model = mode.apply_mode(hf_model, cfg)          # in place; only adapters are trainable
    loss = out_ce + 0.3 * mode.kd_loss(model, generation_batch)

Submodules load on first use, so ``import mode`` stays cheap. The method lives here; the experiment
harness apart from it: the trainer in ``mode.train`` and what it trains on in ``mode.workloads``
(the ``[train]`` extra: scikit-learn, matplotlib, PyYAML), never imported from here.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MoDEConfig": "config",
    "ModalitySpec": "modality",
    "MoDELinear": "layer",
    "apply_mode": "model",
    "attach_routing": "model",
    "teacher_mode": "model",
    "save_adapter": "adapter_io",
    "load_adapter": "adapter_io",
    "kd_loss": "kd",
}

# Submodules reachable as attributes without an explicit import (mode.peft.register(...)).
_SUBMODULES = ("peft",)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mode' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
