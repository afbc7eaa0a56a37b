"""Argument checks shared by the ops. Every failure is a ValueError naming the argument."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Value checks (ids in range) need the data on the host. On CPU they are free and always run;
# on CUDA they force a device sync, so they are off by default (a device-side assertion checks
# instead, without waiting) and on with MODE_KERNELS_SYNC_CHECKS=1 or set_sync_checks(True).
_sync_checks = os.environ.get("MODE_KERNELS_SYNC_CHECKS", "0") == "1"


def set_sync_checks(enabled: bool) -> None:
    """Enable or disable value checks that force a host-device sync on CUDA tensors.

    They are off by default (CUDA ids are then checked by an asynchronous device assertion);
    ``MODE_KERNELS_SYNC_CHECKS=1`` in the environment turns them on at import. CPU tensors are
    always checked.
    """
    global _sync_checks
    _sync_checks = bool(enabled)


def sync_checks_enabled(device: torch.device) -> bool:
    return device.type == "cpu" or _sync_checks


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_modality_ids(ids: torch.Tensor, num_modalities: int, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected an integer tensor of modality ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {ids.dtype}")
    ids = ids.to(torch.int64)
    if ids.numel() and not _compiling():
        if sync_checks_enabled(ids.device):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= num_modalities:
                raise ValueError(
                    f"{name}: modality ids must lie in [0, {num_modalities}), got values in [{lo}, {hi}]")
        else:
            torch._assert_async(((ids >= 0) & (ids < num_modalities)).all(),
                                f"{name}: modality ids must lie in [0, {num_modalities})")
    return ids


def check_experts_per_modality(experts_per_modality, num_modalities: int | None = None) -> tuple[int, ...]:
    """Experts per modality as a tuple of ints >= 1: ``num_modalities`` of them when given, else at least one."""
    try:
        experts = tuple(int(e) for e in experts_per_modality)
        ok = all(e >= 1 and e == f for e, f in zip(experts, experts_per_modality)) and \
            (len(experts) == num_modalities if num_modalities is not None else len(experts) >= 1)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        count = f"{num_modalities}" if num_modalities is not None else "a non-empty tuple of"
        raise ValueError(f"experts_per_modality: expected {count} ints >= 1, got {experts_per_modality!r}")
    return experts


def check_float(t: torch.Tensor, name: str, allow_float64: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    allowed = FLOAT_DTYPES if allow_float64 else FLOAT_DTYPES[:-1]
    if t.dtype not in allowed:
        raise ValueError(f"{name}: expected one of {[str(d) for d in allowed]}, got {t.dtype}")


def check_shape(t: torch.Tensor, name: str, expected: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {list(expected)}{extra}, got {list(t.shape)}")


def check_same_device(ref: torch.Tensor, ref_name: str, **tensors) -> None:
    device = ref.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected device {device} (that of {ref_name}), got {t.device}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    return float(temperature)


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_vocab_range(vocab_range, vocab: int) -> tuple[int, int]:
    if vocab_range is None:
        return 0, vocab
    try:
        lo, hi = (int(v) for v in vocab_range)
    except (TypeError, ValueError):
        raise ValueError(f"vocab_range: expected a pair (lo, hi) of ints, got {vocab_range!r}") from None
    if not 0 <= lo < hi <= vocab:
        raise ValueError(f"vocab_range: expected 0 <= lo < hi <= {vocab} (the vocab size), got ({lo}, {hi})")
    return lo, hi


def check_topk(topk, slice_width: int) -> int | None:
    if topk is None:
        return None
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= slice_width:
        raise ValueError(f"topk: expected an int in [1, {slice_width}] (the vocab slice size), got {topk!r}")
    return topk


def check_mask(mask, lead_shape: tuple, ref: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor, got {got}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask: expected shape {list(lead_shape)} (the logits' leading dims), got {list(mask.shape)}")
    check_same_device(ref, "the logits", mask=mask)
    return mask
