"""Routing metadata for modality-routed LoRA: one small function, computed on the device.

A plan holds each token's modality id (what the Triton kernels read: they work in token order)
and the tokens sorted stably by modality (what the torch reference uses to gather each
modality's rows). Everything is computed with device ops whose output sizes follow from the
input shape alone, so building a plan never waits on the device (no ``.item()``, no
``nonzero``) unless sync checks are on (see ``mode_kernels.set_sync_checks``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validation import check_modality_ids, check_same_device

# Kept for the signature of plan_routing (its ``block_m`` argument): kernels no longer tile by modality.
DEFAULT_BLOCK_M = 128


class RoutingPlan(NamedTuple):
    """Tokens of one forward pass and their modalities.

    Attributes:
        order: int64 [T], token indices (into the flattened tokens) sorted stably by modality.
        offsets: int64 [M + 1], modality m owns ``order[offsets[m]:offsets[m + 1]]``.
        modality: int32 [T], each token's modality id, in token order.
        num_modalities: M.
    """

    order: torch.Tensor
    offsets: torch.Tensor
    modality: torch.Tensor
    num_modalities: int

    @property
    def num_tokens(self) -> int:
        return self.order.shape[0]

    def counts(self) -> torch.Tensor:
        """Tokens per modality, int64 [M], on the plan's device."""
        return self.offsets[1:] - self.offsets[:-1]


def plan_routing(modality: torch.Tensor, num_modalities: int, *, block_m: int = DEFAULT_BLOCK_M) -> RoutingPlan:
    """Build the routing plan for integer modality ids of any shape (flattened in C order).

    The same plan serves every adapted layer of a model forward, since the ids do not change
    from layer to layer. Ids must lie in ``[0, num_modalities)``: checked with a ValueError on CPU
    always and on CUDA when sync checks are on; otherwise on CUDA by an asynchronous device
    assertion (no host sync). ``block_m`` (a power of two >= 16) is accepted for compatibility;
    the kernels work in token order and do not use it.
    """
    if not isinstance(num_modalities, int) or isinstance(num_modalities, bool) or num_modalities < 1:
        raise ValueError(f"num_modalities: expected an int >= 1, got {num_modalities!r}")
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m!r}")
    ids = check_modality_ids(modality, num_modalities, "modality").reshape(-1)
    # A stable sort keeps each modality's tokens in their original order (deterministic rows).
    _, order = torch.sort(ids, stable=True)
    counts = torch.zeros(num_modalities, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(0, num_modalities - 1), torch.ones_like(ids))
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return RoutingPlan(order, offsets, ids.to(torch.int32), num_modalities)


def routing_plan_for(modality: torch.Tensor | RoutingPlan, x: torch.Tensor, num_modalities: int) -> RoutingPlan:
    """The plan of ``modality_lora_linear``'s ``modality`` argument (ids or a plan), checked against the tokens
    of x [..., K]. (Here rather than in ``_validation``, which this module imports.)"""
    lead = tuple(x.shape[:-1])
    num_tokens = math.prod(lead)
    if isinstance(modality, RoutingPlan):
        plan = modality
        if plan.num_modalities != num_modalities:
            raise ValueError(f"modality: the plan has {plan.num_modalities} modalities, experts_per_modality "
                             f"has {num_modalities}")
        if plan.num_tokens != num_tokens:
            raise ValueError(f"modality: the plan covers {plan.num_tokens} tokens, x has {num_tokens}")
    elif isinstance(modality, torch.Tensor):
        if tuple(modality.shape) != lead:
            raise ValueError(f"modality: expected shape {list(lead)} (x.shape[:-1]), got {list(modality.shape)}")
        plan = plan_routing(modality, num_modalities)
    else:
        raise ValueError(f"modality: expected an integer tensor or a RoutingPlan, got {type(modality).__name__}")
    check_same_device(x, "x", modality=plan.order)
    return plan
