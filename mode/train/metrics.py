"""Continual-learning metrics of a run, and the content of ``metrics.json``."""
from __future__ import annotations

import numpy as np


def average_accuracy(acc_matrix: list[list[float]]) -> float:
    """Mean accuracy (or any per-task score) over all tasks after the last one."""
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


# Per-task scores of a workload's evaluation -> (matrix, average after the last task, backward transfer)
# in metrics.json. Exact match is the headline; the digit named right and the answer NLL are graded
# companions (a skill kept under a changed answer format; a likelihood that moves before a greedy
# answer flips). For the NLL, lower is better: a positive answer_nll_bwt is forgetting.
TASK_SCORES = {
    "accs": ("acc_matrix", "avg_acc", "bwt"),
    "digit_accs": ("digit_acc_matrix", "avg_digit_acc", "digit_bwt"),
    "answer_nlls": ("answer_nll_matrix", "avg_answer_nll", "answer_nll_bwt"),
}


def task_score_metrics(results: list[dict]) -> dict:
    """The matrices, averages and backward transfers of the per-task scores that the evaluations
    after each task (``results``) hold."""
    metrics = {}
    for key, (matrix_name, average_name, bwt_name) in TASK_SCORES.items():
        if results[0].get(key) is not None:
            matrix = [r[key] for r in results]
            metrics |= {matrix_name: matrix, average_name: average_accuracy(matrix),
                        bwt_name: backward_transfer(matrix)}
    return metrics


# The scalars of a method's run that metrics.json summarises over seeds as [mean, standard error].
SUMMARY_KEYS = ("avg_acc", "bwt", "gen_retention", "avg_digit_acc", "digit_bwt", "avg_answer_nll", "answer_nll_bwt",
                "gen_acc_last", "image_nll_last", "train_seconds")


def mean_and_standard_error(values: list[float | None]) -> list[float | None] | None:
    """[mean, standard error of the mean (sample std / sqrt(n))]; the error is None for one value;
    None when any value is None (a score the workload does not have)."""
    if not values or any(v is None for v in values):
        return None
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return [float(np.mean(values)), se]


def seed_summary(per_seed: list[dict]) -> dict:
    """Mean and standard error over seeds of each summary scalar the runs have."""
    scalars = [{**r, "gen_acc_last": r["gen_acc"][-1], "image_nll_last": r["image_nll"][-1]} for r in per_seed]
    return {key: mean_and_standard_error([r.get(key) for r in scalars]) for key in SUMMARY_KEYS
            if key in scalars[0]}


def mean_matrix(per_seed: list[dict], name: str) -> list[list[float]] | None:
    """A matrix (e.g. acc_matrix) averaged over seeds, or None when the runs do not have it."""
    if name not in per_seed[0]:
        return None
    return np.mean([r[name] for r in per_seed], axis=0).tolist()


def metrics_json(state: dict, benchmark: str, task_names: list[str], seeds: tuple[int, ...]) -> dict:
    """metrics.json: the pretrained model's generation scores and, per method, each seed's results
    (``per_seed``, in the order of ``seeds``, each with its ``seed``) and their ``summary``."""
    methods = {}
    for name, by_seed in state["done"].items():
        per_seed = [{"seed": seed, **{k: v for k, v in by_seed[str(seed)].items() if k != "samples"}}
                    for seed in seeds]
        methods[name] = {"per_seed": per_seed, "summary": seed_summary(per_seed)}
    return {
        "benchmark": benchmark,
        "tasks": task_names,
        "seeds": list(seeds),
        "pretrained": {k: state["pretrained"][k] for k in ("gen_acc", "image_nll")},
        "methods": methods,
    }
