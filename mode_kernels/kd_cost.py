"""Which form the student's logits take in the top-k KD loss: dense tiles or gathered weight rows.

With ``topk`` only the student's logits at the teacher's k ids enter the loss and its gradient. Two ways to get
them: **dense** (the [chunk, V] logits of the slice by one GEMM per chunk, then gathered; the d logits scattered
back for two more GEMMs: d hidden, and d weight when it is trainable) or **sparse** (per position, k dot products
with the weight's rows at those ids, then d hidden and d weight over the same rows: k H multiply-adds each
instead of V H). Which is faster depends on the device: a GEMM runs on matrix units (tensor cores, AMX, or a
CPU's best-blocked vector loops) and reuses every operand tile from cache, while a gather runs on plain vector
units and streams k rows of H per position.

Estimates, per pass: time = max(FLOPs / rate, bytes / bandwidth), summed over the passes (2 with a frozen
weight, 3 with a trainable one). Reuse assumption: the dense GEMM reads each operand once (as
``bench/roofline.py`` counts every launch); the gather re-reads its k rows for every position (no reuse across
positions, the worst case: positions of one sequence share many of the teacher's top ids, so caches serve part of
them in practice, and the estimate errs toward dense). ``bench.roofline`` prints both at Anole shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["dense", "sparse"]


@dataclass(frozen=True, slots=True)
class Machine:
    """dense_flops: a GEMM's FLOP/s; gather_flops: gathered dot products' FLOP/s; bandwidth: bytes/s of rows
    read from memory. The GPUs: vendors' dense bf16 tensor-core and FP32 CUDA-core peaks, HBM bandwidth."""

    dense_flops: float
    gather_flops: float
    bandwidth: float


MACHINES: dict[str, Machine] = {
    "H100 SXM": Machine(989e12, 67e12, 3.35e12),
    "H200": Machine(989e12, 67e12, 4.8e12),
    # One core of the 2-core development machine (AVX-512, torch 2.13, 2026-12-07, loaded), measured at P 2048
    # H 256 V 8192 k 256 float32 (bench/kd_topk.py): ATen's GEMM about 80 GFLOP/s; csrc/kd_topk.cpp's gathered
    # dots with their row passes about 17 GFLOP/s, its rows streamed at about 35 GB/s (an 8 MB slice: mostly
    # from cache). Per core, so the ratio holds for any thread count.
    "CPU core": Machine(80e9, 17e9, 35e9),
}

# The backends that implement the sparse form (the others always take dense tiles): native, in csrc/kd_topk.cpp.
# The torch backend measured a chunked gather + batched products slower than its two dense GEMMs; Triton keeps
# dense tiles until a GPU measurement (bench/gpu_check.sh) says otherwise.
SPARSE_BACKENDS = ("native",)


def dense_cost(positions: int, hidden: int, n_vocab: int, itemsize: int, trainable: bool) -> list[tuple[int, int]]:
    """(FLOPs, bytes) per pass of the dense form: each GEMM reads the hidden states and the weight slice once
    and writes or reads float32 logits of the slice."""
    passes = 3 if trainable else 2
    flops = 2 * positions * n_vocab * hidden
    moved = (positions + n_vocab) * hidden * itemsize + positions * n_vocab * 4
    return [(flops, moved)] * passes


def sparse_cost(positions: int, hidden: int, topk: int, itemsize: int, trainable: bool) -> list[tuple[int, int]]:
    """(FLOPs, bytes) per pass of the sparse form, the k gathered rows read again for every position."""
    passes = 3 if trainable else 2
    flops = 2 * positions * topk * hidden
    moved = positions * topk * hidden * itemsize + positions * hidden * itemsize
    return [(flops, moved)] * passes


def selection_cost(positions: int, hidden: int, n_vocab: int, topk: int, itemsize: int) -> tuple[int, int]:
    """(FLOPs, bytes) of the teacher's top-k selection done inside its logits GEMM (the Triton backend's
    ``_select_kernel``): the GEMM's operands read once, the k int64 ids and float32 values written, no logits
    stored. The selection's compares run beside the GEMM on other units and are not counted."""
    return 2 * positions * n_vocab * hidden, (positions + n_vocab) * hidden * itemsize + positions * topk * 12


def seconds(passes: list[tuple[int, int]], machine: Machine, dense: bool) -> float:
    rate = machine.dense_flops if dense else machine.gather_flops
    return sum(max(f / rate, b / machine.bandwidth) for f, b in passes)


def estimates(machine: str, positions: int, hidden: int, n_vocab: int, topk: int, itemsize: int,
              trainable: bool) -> dict[Strategy, float]:
    """Estimated seconds of the student's part of the top-k loss in each form on ``machine``."""
    m = MACHINES[machine]
    return {"dense": seconds(dense_cost(positions, hidden, n_vocab, itemsize, trainable), m, True),
            "sparse": seconds(sparse_cost(positions, hidden, topk, itemsize, trainable), m, False)}


def topk_strategy(backend: str, positions: int, hidden: int, n_vocab: int, topk: int,
                  trainable: bool) -> Strategy:
    """The form a resolved backend runs for these sizes: dense unless it has the sparse form and the estimate
    on its machine says the sparse one is faster (the native backend's operands are float32: it upcasts)."""
    if backend not in SPARSE_BACKENDS:
        return "dense"
    times = estimates("CPU core", positions, hidden, n_vocab, topk, 4, trainable)
    return "sparse" if times["sparse"] < times["dense"] else "dense"
