"""Benchmarks of mode-kernels against the baselines a user would otherwise run.

- ``bench.baselines``: naive routed-LoRA layers (MoDE-official style, PEFT loop, torch grouped GEMM)
  and the naive KD loss, computing the same values as ``mode_kernels`` (tests/bench/test_baselines.py).
- ``python -m bench.run``: times every case side by side and writes results.json / results.md.
- ``pytest bench/ --benchmark-only``: small CPU microbenchmarks (pytest-benchmark).
- ``bench/gpu_check.sh``: CUDA tests, compile check and ``bench.run --quick`` in one call on a GPU box.
"""
