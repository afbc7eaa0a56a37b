"""Microbenchmark: one MoDE training step of a small Chameleon-shaped model on CPU, naive vs ours."""
import pytest
import torch

from bench.model import ModelShape, training_step

SHAPE = ModelShape(hidden=128, mlp=344, vocab=2048, layers=1, heads=4, batch=1, seq=128, image_span=32)


@pytest.mark.parametrize("impl", ["naive", "ours"])
def test_training_step(benchmark, impl):
    benchmark.group = f"training step {SHAPE.label()}"
    step, _ = training_step(SHAPE, impl, torch.device("cpu"), torch.float32)
    benchmark(step)
