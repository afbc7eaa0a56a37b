"""Hugging Face integrations of MoDE (loaded on first use: ``mode.hf.MoDETrainer`` imports transformers' Trainer)."""
from __future__ import annotations

import importlib

_EXPORTS = {"MoDETrainer": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mode.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
