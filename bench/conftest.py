"""pytest-benchmark set-up for ``pytest bench/ --benchmark-only`` (CPU, small shapes)."""
import torch

# One thread: on a shared machine, intra-op threads spin-wait on each other and timings explode.
torch.set_num_threads(1)
