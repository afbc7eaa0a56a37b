"""Continual-learning metrics of a run, and the content of ``metrics.json``."""
from __future__ import annotations

import numpy as np


def average_accuracy(acc_matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one."""
    return float(np.mean(acc_matrix[-1]))


def backward_transfer(acc_matrix: list[list[float]]) -> float:
    """BWT = mean over tasks j < T-1 of (acc on j after the last task - acc on j right after task j).

    Negative means forgetting; 0 for a single task.
    """
    last = len(acc_matrix) - 1
    if last == 0:
        return 0.0
    return float(np.mean([acc_matrix[last][j] - acc_matrix[j][j] for j in range(last)]))


def retention(gen_acc: float | None, pretrained_gen_acc: float | None) -> float | None:
    """gen_acc after the last task relative to the pretrained model's; None without gen_acc, or
    when the pretrained model's is 0 (nothing to retain: no ratio)."""
    if gen_acc is None or not pretrained_gen_acc:
        return None
    return gen_acc / pretrained_gen_acc


def metrics_json(state: dict, benchmark: str, task_names: list[str]) -> dict:
    """metrics.json: the pretrained model's generation scores and each finished method's results."""
    return {
        "benchmark": benchmark,
        "tasks": task_names,
        "pretrained": {k: state["pretrained"][k] for k in ("gen_acc", "image_nll")},
        "methods": {name: {k: v for k, v in m.items() if k != "samples"} for name, m in state["done"].items()},
    }
