"""Hugging Face helpers and integrations: where a model keeps its decoder and output head, its KV
cache and the one cached decode loop every evaluation uses (``mode.hf.models``); ``mode.hf.MoDETrainer``
and ``mode.hf.MoDESFTTrainer`` (loaded on first use: they import transformers' Trainer, TRL)."""
from __future__ import annotations

import importlib

_EXPORTS = {"MoDETrainer": "trainer", "MoDESFTTrainer": "sft"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mode.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
