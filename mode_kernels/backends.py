"""Backend selection: "torch" (reference, any device), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1), "native" (C++ CPU kernels, built on first use) and "auto" (the fastest
available for the tensors' device: Triton on CUDA, native on CPU when it builds, else torch)."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton", "native")

_REFERENCE = {
    "routed_lora": reference.routed_lora,
    "kd_kl": reference.kd_kl,
    "fused_linear_kd_kl": reference.kd_kl,
}

# Ops with a native CPU implementation, and the mode_kernels.native module that holds it.
_NATIVE = {"routed_lora": "routed_lora", "kd_kl": "kd_kl", "fused_linear_kd_kl": "kd_kl"}


def _triton_module(op: str) -> ModuleType:
    """The Triton implementation of an op; raises saying why it is unavailable."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {exc}") from exc
    try:
        return importlib.import_module(f"mode_kernels.triton.{op}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mode_kernels.triton.{op}":
            raise NotImplementedError(f"backend='triton' has no implementation of {op} yet") from exc
        raise


def triton_available(op: str) -> bool:
    try:
        _triton_module(op)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def native_available() -> bool:
    """Whether the native CPU kernels are on and built (the first call builds them, or warns once)."""
    from . import native
    return native.available()


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Turn the user's backend choice into "torch", "triton" or "native" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available(op) else "torch"
        return "native" if device.type == "cpu" and op in _NATIVE and native_available() else "torch"
    if backend == "native":
        if op not in _NATIVE:
            raise NotImplementedError(f"backend='native' has no implementation of {op} yet")
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs CPU tensors only, got device {device}")
        from . import native
        try:
            native.extension()
        except native.NativeUnavailable as exc:
            raise RuntimeError(f"backend='native' is unavailable: {exc}") from exc
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("backend='triton' runs CPU tensors only under TRITON_INTERPRET=1 "
                               "(set it before triton is imported); use backend='torch' or 'auto' on CPU")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' supports CUDA tensors, got device {device}")
        _triton_module(op)
    return backend


def implementation(backend: str, op: str) -> ModuleType:
    """The module holding ``op``'s forward and backward for a resolved backend."""
    if backend == "native":
        return importlib.import_module(f"mode_kernels.native.{_NATIVE[op]}")
    return _REFERENCE[op] if backend == "torch" else _triton_module(op)
