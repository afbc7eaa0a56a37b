"""The fused-linear KD's chunks obey the memory bound on every shape from 2^24 logits up.

Arithmetic only (nothing of these sizes is allocated): each backend's chunk plan, the one its
launcher uses, against a tenth of the naive path's floor (``kd_memory.naive_bytes_per_logit``).
The hidden size does not enter a chunk (a chunk holds logits rows, not hidden rows); the fixed
costs that do not grow with the positions (a float32 weight-gradient accumulator, the torch
backend's float32 copy of a 16-bit weight slice) are documented apart and not part of the chunk.
"""
import pytest
import torch

from mode_kernels import kd_memory
from mode_kernels.reference import kd_kl as reference_kd

triton = pytest.importorskip("triton")
from mode_kernels.triton import fused_linear_kd_kl as tfused  # noqa: E402

POSITIONS = [16, 17, 100, 1000, 4096, 16384, 65536, 1 << 20]
SLICES = [1 << 10, 4097, 8192, 8194, 32768, 65536, 128256, 1 << 20]  # MoDE: 8194; Anole: 65536; Llama 3: 128256
TOPKS = [None, 1, 256, 4096]  # MoDE's official code: 256
LOGITS_FLOOR = 1 << 24


def shapes():
    for positions in POSITIONS:
        for n_vocab in SLICES:
            if positions * n_vocab >= LOGITS_FLOOR:
                for topk in TOPKS:
                    if topk is None or topk <= n_vocab:
                        yield positions, n_vocab, topk


def bound(positions, n_vocab, dtype):
    return kd_memory.EXTRA_MEMORY_FRACTION * positions * n_vocab * kd_memory.naive_bytes_per_logit(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_chunks_stay_within_a_tenth_of_naive(dtype):
    checked = 0
    for positions, n_vocab, topk in shapes():
        step, per_row = tfused.chunk_plan(positions, n_vocab, topk, dtype, dtype)
        assert 1 <= step <= positions
        assert step * per_row <= bound(positions, n_vocab, dtype), (positions, n_vocab, topk, step)
        # Chunks are whole row tiles (or the rest of the positions), unless the bound allows less.
        assert step == positions or step % (tfused.CHUNK_ALIGN // 2) == 0 or step < tfused.CHUNK_ALIGN // 2
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reference_chunks_stay_within_a_tenth_of_naive(dtype):
    for positions, n_vocab, topk in shapes():
        step, per_row = reference_kd.chunk_plan(positions, n_vocab, topk, dtype)
        assert 1 <= step <= positions
        assert step * per_row <= bound(positions, n_vocab, dtype), (positions, n_vocab, topk, step)


def test_chunks_grow_with_the_positions():
    """The bound is a fraction of the naive path, not a fixed entry count: at a fixed slice the
    chunk grows with the positions and uses most of the budget (less one row tile of rounding)."""
    positions = (4096, 16384, 65536)
    plans = [tfused.chunk_plan(p, 8194, None, torch.bfloat16, torch.bfloat16) for p in positions]
    assert plans[0][0] < plans[1][0] < plans[2][0]
    for p, (step, per_row) in zip(positions, plans):
        assert (step + tfused.CHUNK_ALIGN) * per_row > bound(p, 8194, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_below_the_floor_chunks_use_the_floors_budget(dtype):
    """Below 2^24 logits the chunks may use the budget of 2^24 logits: 16 positions of MoDE's
    slice run as one chunk, not as 16 chunks of one position; never more than that budget."""
    assert tfused.chunk_plan(16, 8194, None, dtype, dtype)[0] == 16
    assert reference_kd.chunk_plan(16, 8194, None, dtype)[0] == 16
    for positions in (1, 16, 100, 1000, 2000):
        for n_vocab in (1 << 10, 8194, 1 << 13):
            if positions * n_vocab < LOGITS_FLOOR:
                step, per_row = tfused.chunk_plan(positions, n_vocab, None, dtype, dtype)
                assert step * per_row <= bound(LOGITS_FLOOR, 1, dtype)
