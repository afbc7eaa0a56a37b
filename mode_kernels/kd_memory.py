"""The memory bound of the fused-linear KD op, and the chunk of positions it implies.

The naive path (``bench.baselines.naive_linear_kd_kl``: both logits materialised, a float32
log-softmax of each) holds at least four [P, n] tensors at once: the two logits in the input
dtype and the two float32 log-softmaxes, so at least ``naive_bytes_per_logit`` bytes per logit
of the slice. The fused op processes its positions in chunks whose working set (the bytes each
backend holds per row of a chunk, stated next to its chunk loop) stays within
``EXTRA_MEMORY_FRACTION`` of that floor, on every shape. Fixed costs that do not grow with P
(a float32 copy of a 16-bit weight slice on the torch backend, the float32 weight-gradient
accumulator of a trainable 16-bit weight) come on top and are documented where they are made.
"""
from __future__ import annotations

import torch

EXTRA_MEMORY_FRACTION = 0.1
# The bound holds from this many logits up. A smaller problem may use the budget of this size
# (a tenth of the naive path's floor at 2^24 logits: 19.2 MiB for 16-bit logits), so it runs in
# one or a few chunks, not in chunks of single positions (16 positions of an 8192-entry slice
# would otherwise get chunks of one position: a tile of 32-128 rows run for 1, 16 times over).
BOUNDED_FROM_LOGITS = 1 << 24


def naive_bytes_per_logit(dtype: torch.dtype) -> int:
    """A floor of the naive path's bytes per logit: two logits in ``dtype``, two float32 (or
    float64) log-softmaxes."""
    return 2 * dtype.itemsize + 2 * max(dtype.itemsize, 4)


def chunk_rows(n_rows: int, n_vocab: int, dtype: torch.dtype, bytes_per_row: int, align: int = 1) -> int:
    """Positions per chunk: as many as keep ``bytes_per_row`` per position within the bound (of
    n_rows x n_vocab logits, or of BOUNDED_FROM_LOGITS when fewer), rounded down to a multiple of
    ``align`` (the kernels' largest row tile), or to half of it, so no row tile runs partly empty;
    below half of it, as many as fit (at least 1: tiles then pad).

    (One position per chunk can still exceed the bound when P is tiny and the slice huge: P below
    about 1 / EXTRA_MEMORY_FRACTION. Every shape with 2^24 logits or more, a slice of at most
    2^20 entries and top-k at most 4096 stays within it: tests/kernels/test_kd_memory.py.)"""
    logits = max(n_rows * n_vocab, BOUNDED_FROM_LOGITS)
    budget = EXTRA_MEMORY_FRACTION * logits * naive_bytes_per_logit(dtype)
    rows = int(budget // max(bytes_per_row, 1))
    if rows >= n_rows:
        return n_rows
    if rows >= align:
        return rows - rows % align
    return align // 2 if 1 < align <= 2 * rows else max(1, rows)
