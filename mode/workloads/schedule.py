"""The learning-rate schedule of the trainer and of the digits pretraining."""
from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, warmup_steps: int, lr: float) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
