"""The contract between each op (``mode_kernels/ops``) and its backends (``reference`` = torch, ``native``,
``triton``): per op, a ``typing.Protocol`` that every backend module implements in full, the op's options as one
frozen dataclass, and named tuples for what travels between the forward and the backward (the gradients needed,
the gradients returned, what the forward keeps for the backward).

The ops' torch custom ops need flat schemas (tensors, ints, floats, bools, strings): each op converts between
those and these types in one helper at the custom-op boundary.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:  # routing imports _validation, which imports this module
    from .routing import RoutingPlan

# --- routed LoRA (``modality_lora_linear``) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutedLoraOptions:
    """experts_per_modality: M ints >= 1 (experts ordered by modality); scaling: the LoRA scaling alpha / r."""

    experts_per_modality: tuple[int, ...]
    scaling: float


class RoutedLoraSaved(NamedTuple):
    """What a backend's forward keeps for its backward (never differentiated), so the backward need not
    recompute it. Triton: ``rank`` the gated rank intermediate H [T, E*r(+pad)], ``gates`` the router's gates
    [T, E] float32 (empty without a router). Native: ``rank`` the shrink [E*r (+ E), T], ``gates`` empty.
    Torch: both empty."""

    rank: Tensor
    gates: Tensor

    @classmethod
    def nothing(cls, x: Tensor) -> RoutedLoraSaved:
        """The explicit "nothing saved" of a backend that recomputes: two empty tensors."""
        return cls(x.new_empty(0), x.new_empty(0))


class RoutedLoraNeeds(NamedTuple):
    """Which gradients the backward computes; an input that is None never needs one."""

    x: bool
    lora_input: bool
    weight: bool
    bias: bool
    lora_a: bool
    lora_b: bool
    router_weight: bool


class RoutedLoraGrads(NamedTuple):
    """The gradients, named as the inputs; None where not needed. With lora_input None the adapters' input
    gradient is part of ``x``'s."""

    x: Tensor | None
    lora_input: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    lora_a: Tensor | None
    lora_b: Tensor | None
    router_weight: Tensor | None


@runtime_checkable
class RoutedLoraBackend(Protocol):
    """A backend of ``modality_lora_linear``. Tokens are flat: x, lora_input (u; None means x) [T, K]; weight
    [N, K]; bias [N] or None; lora_a [E, r, K]; lora_b [E, N, r]; router_weight [E, K] or None."""

    def routed_lora_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_input: Tensor | None,
                            plan: RoutingPlan, lora_a: Tensor, lora_b: Tensor, router_weight: Tensor | None,
                            options: RoutedLoraOptions) -> tuple[Tensor, RoutedLoraSaved]:
        """(y [T, N] in x's dtype, what the backward reuses)."""

    def saved_like(self, x: Tensor, lora_a: Tensor, router_weight: Tensor | None,
                   options: RoutedLoraOptions) -> RoutedLoraSaved:
        """Empty tensors shaped like the forward's ``RoutedLoraSaved``: the fake (meta) implementation's."""

    def routed_lora_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                             lora_input: Tensor | None, plan: RoutingPlan, lora_a: Tensor, lora_b: Tensor,
                             router_weight: Tensor | None, options: RoutedLoraOptions, needs: RoutedLoraNeeds,
                             saved: RoutedLoraSaved | None = None) -> RoutedLoraGrads:
        """The gradients in ``needs``, each in its input's dtype; ``saved`` is the forward's (None: recompute)."""


# --- KD loss (``kd_kl_loss`` and ``fused_linear_kd_kl_loss``) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class KdOptions:
    """temperature T > 0; the vocab slice [lo, hi) that counts; topk: only the teacher's k largest logits in the
    slice count (the fused-linear form only: ``kd_kl_loss`` gathers them itself and its backends see None);
    topk_tail: the mass outside those k is one more outcome of both distributions (needs topk).

    Ties at the k-th largest teacher logit: the lower vocabulary ids are taken (``TIES_RULE``); every backend's
    selection follows it, and a selection lists its ids in ascending order."""

    temperature: float
    lo: int
    hi: int
    topk: int | None = None
    topk_tail: bool = False


TIES_RULE = "among teacher logits equal to the k-th largest, the lower vocabulary ids are taken"


class TeacherTopk(NamedTuple):
    """The teacher given as its top k per position, in place of its hidden states and weight.

    indices: [..., k] vocabulary ids in the slice [lo, hi), distinct within a position (any integer dtype: int16 /
    int32 keep a cache small); logits: [..., k] float, the teacher's raw logits at those ids (before the
    temperature; -inf, or the dtype's most negative finite value, marks an entry masked: probability 0);
    logsumexp: [...] float or None, logsumexp over the whole slice of logits / T at the loss's temperature
    (needed by ``topk_tail`` only: the teacher's mass outside the k). The backends see them flat ([P, k], [P])."""

    indices: Tensor
    logits: Tensor
    logsumexp: Tensor | None = None


class KdKlRows(NamedTuple):
    """Per row: the loss (float32, float64 for float64 logits) and the two logsumexps the backward reuses."""

    loss: Tensor
    lse_s: Tensor
    lse_t: Tensor


@runtime_checkable
class KdKlBackend(Protocol):
    """A backend of ``kd_kl_loss``: student, teacher [P, V]; mask bool [P] or None."""

    def kd_kl_forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None, options: KdOptions) -> KdKlRows:
        """The loss of each row and its logsumexps (0 on dead rows)."""

    def kd_kl_backward(self, grad_rows: Tensor, student: Tensor, teacher: Tensor, mask: Tensor | None,
                       lse_s: Tensor, lse_t: Tensor, options: KdOptions) -> Tensor:
        """d loss / d student [P, V] in the student's dtype (zero outside [lo, hi))."""


class FusedLinearKdKlNeeds(NamedTuple):
    """Which gradients of sum_p row_weight[p] * loss[p] to compute."""

    hidden: bool
    weight: bool


class FusedLinearKdKlResult(NamedTuple):
    """The loss per position, and the gradients asked for (None otherwise) in their inputs' dtypes."""

    loss: Tensor
    d_hidden: Tensor | None
    d_weight: Tensor | None


@runtime_checkable
class FusedLinearKdKlBackend(Protocol):
    """A backend of ``fused_linear_kd_kl_loss``: hs, ht [P, H]; ws, wt [V, H] (wt None means ws).

    With ``options.topk`` the op either runs ``fused_linear_kd_kl`` (the student's dense logits tiles, the
    teacher's top k selected and the student's gathered from them) or ``teacher_topk`` then
    ``fused_linear_kd_kl_given``; ``mode_kernels.kd_cost.topk_strategy`` decides which."""

    def fused_linear_kd_kl(self, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor | None, mask: Tensor | None,
                           options: KdOptions, row_weight: Tensor | None,
                           needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
        """The loss per position and, as ``needs`` says, the gradients of sum_p row_weight[p] * loss[p]
        (the teacher is a constant; row_weight [P] is used only for the gradients). Not with topk_tail."""

    def teacher_topk(self, ht: Tensor, wt: Tensor, options: KdOptions, logsumexp: bool) -> TeacherTopk:
        """The teacher's top ``options.topk`` logits of the slice per position (ids ascending, int64, ties by
        ``TIES_RULE``; logits in float32, float64 for float64 inputs), computed chunk by chunk of positions (no
        [P, V] logits); with ``logsumexp`` also the slice's logsumexp of logits / T."""

    def fused_linear_kd_kl_given(self, hs: Tensor, teacher: TeacherTopk, ws: Tensor, mask: Tensor | None,
                                 options: KdOptions, row_weight: Tensor | None,
                                 needs: FusedLinearKdKlNeeds) -> FusedLinearKdKlResult:
        """As ``fused_linear_kd_kl`` with the teacher given as its top k ([P, k] int64 ids in [lo, hi), [P, k]
        logits; ``options.topk`` is k); only the student's logits at those ids enter (plus, with
        ``options.topk_tail``, its logsumexp over the whole slice)."""


# The custom ops rebuild the same few options on every call (they are constants of a model): one shared instance
# per value (a frozen dataclass's __init__ costs about 1 us a call, a cache hit a fifth of that). Positional
# arguments of the fields' types (a float scaling / temperature). Not for code that torch.compile traces (the API):
# dynamo cannot trace an lru_cache; the custom ops' bodies are opaque to it.
routed_lora_options = functools.lru_cache(maxsize=256)(RoutedLoraOptions)
kd_options = functools.lru_cache(maxsize=256)(KdOptions)

PROTOCOLS: dict[str, type] = {"routed_lora": RoutedLoraBackend, "kd_kl": KdKlBackend,
                              "fused_linear_kd_kl": FusedLinearKdKlBackend}

