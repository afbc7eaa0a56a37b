"""Argument checks shared by the ops. Every failure is a ValueError naming the argument."""
from __future__ import annotations

import os

import torch

from .contract import KdOptions, RoutedLoraOptions, TeacherTopk

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


def check_routed_lora(x, weight, bias, lora_a, lora_b, router_weight, experts_per_modality, scaling,
                      lora_input) -> RoutedLoraOptions:
    """The tensors and options of ``modality_lora_linear`` (its ``modality``: ``routing.routing_plan_for``)."""
    experts = check_experts_per_modality(experts_per_modality)
    num_experts = sum(experts)
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., K], got a scalar")
    k = x.shape[-1]
    check_float(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight: expected shape [N, {k}] (K = x.shape[-1]), got {list(weight.shape)}")
    n = weight.shape[0]
    check_float(lora_a, "lora_a")
    check_float(lora_b, "lora_b")
    if lora_a.dim() != 3 or lora_a.shape[0] != num_experts or lora_a.shape[2] != k:
        raise ValueError(f"lora_a: expected shape [{num_experts}, r, {k}] (E = sum(experts_per_modality), "
                         f"K = x.shape[-1]), got {list(lora_a.shape)}")
    check_shape(lora_b, "lora_b", (num_experts, n, lora_a.shape[1]), "[E, N, r] with E, r from lora_a, N from weight")
    if bias is not None:
        check_float(bias, "bias")
        check_shape(bias, "bias", (n,), "[N]")
    if router_weight is not None:
        check_float(router_weight, "router_weight")
        check_shape(router_weight, "router_weight", (num_experts, k), "[E, K]")
    elif max(experts) > 1:
        raise ValueError(f"router_weight: required when a modality has more than one expert "
                         f"(experts_per_modality={experts})")
    if lora_input is not None:
        check_float(lora_input, "lora_input")
        check_shape(lora_input, "lora_input", tuple(x.shape), "the shape of x")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling: expected a number, got {scaling!r}")
    check_same_device(x, "x", weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                      router_weight=router_weight, lora_input=lora_input)
    return RoutedLoraOptions(experts, float(scaling))


def check_student_teacher(student, teacher, student_name: str, teacher_name: str, last: str) -> None:
    """A float student [..., last] and a float teacher of the same shape."""
    check_float(student, student_name)
    check_float(teacher, teacher_name)
    if student.dim() < 1:
        raise ValueError(f"{student_name}: expected shape [..., {last}], got a scalar")
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher_name}: expected shape {list(student.shape)} (that of {student_name}), "
                         f"got {list(teacher.shape)}")


def check_kd_options(temperature, vocab_range, topk, reduction, mask, vocab: int,
                     ref: torch.Tensor) -> tuple[KdOptions, str, torch.Tensor | None]:
    """(options, reduction, mask) of a KD loss over ``vocab`` entries; ``ref`` [..., H or V] gives the mask's
    shape and device."""
    temperature = check_temperature(temperature)
    reduction = check_reduction(reduction)
    lo, hi = check_vocab_range(vocab_range, vocab)
    mask = check_mask(mask, tuple(ref.shape[:-1]), ref)
    return KdOptions(temperature, lo, hi, check_topk(topk, hi - lo)), reduction, mask


def check_kd_kl(student_logits, teacher_logits, temperature, vocab_range, topk, reduction,
                mask) -> tuple[KdOptions, str, torch.Tensor | None]:
    """The arguments of ``kd_kl_loss``: (options, reduction, mask)."""
    check_student_teacher(student_logits, teacher_logits, "student_logits", "teacher_logits", "V")
    check_same_device(student_logits, "student_logits", teacher_logits=teacher_logits)
    return check_kd_options(temperature, vocab_range, topk, reduction, mask, student_logits.shape[-1],
                            student_logits)


def check_hidden_and_weight(hidden, name: str, weight) -> None:
    """Float hidden states [..., H] and a float weight [V, H]."""
    check_float(hidden, name)
    if hidden.dim() < 1:
        raise ValueError(f"{name}: expected shape [..., H], got a scalar")
    check_float(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (H = {name}.shape[-1]), "
                         f"got {list(weight.shape)}")


INDEX_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32)


def check_topk_tail(topk_tail, topk) -> bool:
    if not isinstance(topk_tail, bool):
        raise ValueError(f"topk_tail: expected a bool, got {topk_tail!r}")
    if topk_tail and topk is None:
        raise ValueError("topk_tail: the tail bucket needs topk (the mass outside the teacher's top k)")
    return topk_tail


def check_teacher_topk(teacher, lead_shape: tuple, ref: torch.Tensor, lo: int, hi: int, topk, topk_tail: bool,
                       temperature: float) -> int:
    """A ``TeacherTopk`` for positions of ``lead_shape`` and the slice [lo, hi); returns k. Values (ids in the
    slice and distinct per position, no NaN or +inf logit, a logsumexp at least that of the given logits) are
    checked where ``sync_checks_enabled``."""
    if not isinstance(teacher, TeacherTopk):
        raise ValueError(f"teacher_topk: expected a mode_kernels.TeacherTopk(indices, logits, logsumexp), "
                         f"got {type(teacher).__name__}")
    indices, logits, lse = teacher
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"teacher_topk.indices: expected an integer tensor ({[str(d) for d in INDEX_DTYPES]}), "
                         f"got {got}")
    if indices.dim() != len(lead_shape) + 1 or tuple(indices.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_topk.indices: expected shape {list(lead_shape) + ['k']} (the student's leading "
                         f"dims), got {list(indices.shape)}")
    k = indices.shape[-1]
    if not 1 <= k <= hi - lo:
        raise ValueError(f"teacher_topk.indices: expected k in [1, {hi - lo}] (the vocab slice size), got {k}")
    if topk is not None and topk != k:
        raise ValueError(f"topk: expected None or {k} (the teacher's k), got {topk!r}")
    check_float(logits, "teacher_topk.logits")
    check_shape(logits, "teacher_topk.logits", tuple(indices.shape), "that of teacher_topk.indices")
    if topk_tail:
        if lse is None:
            raise ValueError("teacher_topk.logsumexp: required with topk_tail (the teacher's mass outside its k)")
    if lse is not None:
        check_float(lse, "teacher_topk.logsumexp")
        check_shape(lse, "teacher_topk.logsumexp", tuple(lead_shape), "the student's leading dims")
    check_same_device(ref, "student_hidden", **{"teacher_topk.indices": indices, "teacher_topk.logits": logits,
                                                "teacher_topk.logsumexp": lse})
    if indices.numel() == 0 or _compiling() or not sync_checks_enabled(indices.device):
        return k
    ids = indices.reshape(-1, k).to(torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < lo or high >= hi:
        raise ValueError(f"teacher_topk.indices: expected vocabulary ids in the slice [{lo}, {hi}), got values in "
                         f"[{low}, {high}]")
    if k > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher_topk.indices: expected distinct ids within each position, got a repeated id")
    if bool((logits.isnan() | (logits == float("inf"))).any()):
        raise ValueError("teacher_topk.logits: expected no NaN or +inf entries (-inf marks an entry masked)")
    if lse is not None:
        if bool((lse.isnan() | (lse == float("inf"))).any()):
            raise ValueError("teacher_topk.logsumexp: expected no NaN or +inf entries")
        masked = logits <= torch.finfo(logits.dtype).min
        given = torch.logsumexp((logits.double() / temperature).masked_fill(masked, float("-inf")), dim=-1)
        if bool((lse.double() < given - 1e-3 * given.abs().clamp(min=1)).any()):
            raise ValueError("teacher_topk.logsumexp: expected at least the logsumexp of the given logits / "
                             "temperature (it is that of the whole slice)")
    return k


def check_fused_linear_kd_kl(student_hidden, teacher_hidden, weight, teacher_weight, teacher_topk, temperature,
                             vocab_range, topk, topk_tail, reduction,
                             mask) -> tuple[KdOptions, str, torch.Tensor | None]:
    """The arguments of ``fused_linear_kd_kl_loss``: (options, reduction, mask). The teacher is either
    teacher_hidden (and teacher_weight) or teacher_topk."""
    check_hidden_and_weight(student_hidden, "student_hidden", weight)
    if teacher_topk is not None:
        if teacher_hidden is not None:
            raise ValueError("teacher_hidden: expected None when teacher_topk gives the teacher")
        if teacher_weight is not None:
            raise ValueError("teacher_weight: expected None when teacher_topk gives the teacher")
        check_same_device(student_hidden, "student_hidden", weight=weight)
        options, reduction, mask = check_kd_options(temperature, vocab_range, None, reduction, mask,
                                                    weight.shape[0], student_hidden)
        topk_tail = check_topk_tail(topk_tail, True)
        k = check_teacher_topk(teacher_topk, tuple(student_hidden.shape[:-1]), student_hidden, options.lo,
                               options.hi, topk, topk_tail, options.temperature)
        return KdOptions(options.temperature, options.lo, options.hi, k, topk_tail), reduction, mask
    if teacher_hidden is None:
        raise ValueError("teacher_hidden: expected a tensor [..., H] (or teacher_topk), got None")
    check_student_teacher(student_hidden, teacher_hidden, "student_hidden", "teacher_hidden", "H")
    if teacher_weight is not None:
        check_float(teacher_weight, "teacher_weight")
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight: expected shape {list(weight.shape)} (that of weight), "
                             f"got {list(teacher_weight.shape)}")
    check_same_device(student_hidden, "student_hidden", teacher_hidden=teacher_hidden, weight=weight,
                      teacher_weight=teacher_weight)
    options, reduction, mask = check_kd_options(temperature, vocab_range, topk, reduction, mask, weight.shape[0],
                                                student_hidden)
    topk_tail = check_topk_tail(topk_tail, options.topk)
    return KdOptions(options.temperature, options.lo, options.hi, options.topk, topk_tail), reduction, mask


def check_teacher_topk_args(teacher_hidden, weight, k, vocab_range, temperature) -> KdOptions:
    """The arguments of ``teacher_topk``: (options with topk = k)."""
    check_hidden_and_weight(teacher_hidden, "teacher_hidden", weight)
    check_same_device(teacher_hidden, "teacher_hidden", weight=weight)
    temperature = check_temperature(temperature)
    lo, hi = check_vocab_range(vocab_range, weight.shape[0])
    if k is None:
        raise ValueError(f"k: expected an int in [1, {hi - lo}] (the vocab slice size), got None")
    try:
        k = check_topk(k, hi - lo)
    except ValueError as exc:
        raise ValueError(str(exc).replace("topk:", "k:", 1)) from None
    return KdOptions(temperature, lo, hi, k)
