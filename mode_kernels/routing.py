"""Routing metadata for modality-routed LoRA: one small function, computed on the device.

A plan orders the tokens stably by modality and cuts each modality's run of tokens into
tiles of ``block_m`` rows. Kernels walk the tile table and gather/scatter rows through
``order``; nothing of size [T, K] is permuted or copied. Everything is computed with
device ops whose output sizes follow from the input shape alone, so building a plan never
waits on the device (no ``.item()``, no ``nonzero``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._validation import check_modality_ids

# Rows per tile: 128 lets the GEMM kernels use 128-row tiles (Hopper wgmma); smaller kernel tiles split it.
DEFAULT_BLOCK_M = 128


class RoutingPlan(NamedTuple):
    """Tokens of one forward pass grouped by modality.

    Attributes:
        order: int64 [T], token indices (into the flattened tokens) sorted stably by modality.
        offsets: int64 [M + 1], modality m owns ``order[offsets[m]:offsets[m + 1]]``.
        tiles: int32 [num_tiles, 3], rows ``(modality, start, end)``: a tile covers
            ``order[start:end]`` (at most ``block_m`` entries, one modality). Tiles past the
            last real one have ``start == end`` and are skipped by the kernels.
        num_modalities: M.
        block_m: rows per tile.
    """

    order: torch.Tensor
    offsets: torch.Tensor
    tiles: torch.Tensor
    num_modalities: int
    block_m: int

    @property
    def num_tokens(self) -> int:
        return self.order.shape[0]

    def counts(self) -> torch.Tensor:
        """Tokens per modality, int64 [M], on the plan's device."""
        return self.offsets[1:] - self.offsets[:-1]


def max_tiles(num_tokens: int, num_modalities: int, block_m: int) -> int:
    """Upper bound on the tiles of any plan with these sizes (each modality wastes < 1 tile)."""
    return -(-num_tokens // block_m) + num_modalities


def plan_routing(modality: torch.Tensor, num_modalities: int, *, block_m: int = DEFAULT_BLOCK_M) -> RoutingPlan:
    """Build the routing plan for integer modality ids of any shape (flattened in C order).

    The same plan serves every adapted layer of a model forward, since the ids do not change
    from layer to layer. Ids must lie in ``[0, num_modalities)``; that is checked on CPU always
    and on CUDA unless sync checks are disabled (see ``mode_kernels.set_sync_checks``).
    """
    if not isinstance(num_modalities, int) or isinstance(num_modalities, bool) or num_modalities < 1:
        raise ValueError(f"num_modalities: expected an int >= 1, got {num_modalities!r}")
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m!r}")
    ids = check_modality_ids(modality, num_modalities, "modality").reshape(-1)
    device = ids.device
    num_tokens = ids.shape[0]

    # A stable sort keeps each modality's tokens in their original order (deterministic rows).
    _, order = torch.sort(ids, stable=True)
    counts = torch.zeros(num_modalities, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)

    tiles_per_modality = (counts + block_m - 1) // block_m
    tile_offsets = torch.cumsum(tiles_per_modality, 0)
    n_tiles = max_tiles(num_tokens, num_modalities, block_m)
    tile = torch.arange(n_tiles, dtype=torch.int64, device=device)
    tile_modality = torch.searchsorted(tile_offsets, tile, right=True)
    real = tile_modality < num_modalities
    m = tile_modality.clamp(max=num_modalities - 1)
    first_tile = tile_offsets[m] - tiles_per_modality[m]
    start = offsets[m] + (tile - first_tile) * block_m
    end = torch.minimum(start + block_m, offsets[m + 1])
    start = torch.where(real, start, torch.zeros_like(start))
    end = torch.where(real, end, torch.zeros_like(end))
    tiles = torch.stack([m, start, end], dim=1).to(torch.int32)
    return RoutingPlan(order, offsets, tiles, num_modalities, block_m)
