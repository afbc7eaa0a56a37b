"""Continual-learning metrics of a run, and the content of ``metrics.json``."""
from __future__ import annotations

from dataclasses import dataclass

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


def new_task_accuracy(acc_matrix: list[list[float]]) -> float:
    """Mean over tasks of the score on each task right after training it (the diagonal): how well
    the method learns, apart from how well it keeps."""
    return float(np.mean(np.diag(acc_matrix)))


def forgetting(acc_matrix: list[list[float]], lower_is_better: bool = False) -> float:
    """Mean over tasks j < T-1 of the best score task j had after any task before the last, minus
    its score after the last (Chaudhry et al. 2018, as Continual-NExT and MCITlib report it); for a
    score where lower is better (the answer NLL), its final value minus its lowest. Positive means
    forgetting; 0 for a single task."""
    matrix = np.asarray(acc_matrix, dtype=float)
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    earlier, final = matrix[:last, :last], matrix[last, :last]
    return float(np.mean(final - earlier.min(axis=0) if lower_is_better else earlier.max(axis=0) - final))


def retention(gen_acc: float | None, pretrained_gen_acc: float | None) -> float | None:
    """gen_acc after the last task relative to the pretrained model's; None without gen_acc, or
    when the pretrained model's is 0 (nothing to retain: no ratio)."""
    if gen_acc is None or not pretrained_gen_acc:
        return None
    return gen_acc / pretrained_gen_acc


@dataclass(frozen=True)
class TaskScore:
    """Where one per-task score of a workload's evaluation goes in metrics.json: its matrix, its
    average after the last task, its backward transfer, its new-task average (the diagonal) and
    its forgetting."""
    matrix: str
    average: str
    bwt: str
    new_task: str
    forgetting: str
    lower_is_better: bool = False


# Exact match is the headline; the digit named right and the answer NLL are graded companions (a
# skill kept under a changed answer format; a likelihood that moves before a greedy answer flips).
# For the NLL, lower is better: a positive answer_nll_bwt is forgetting.
TASK_SCORES = {
    "accs": TaskScore("acc_matrix", "avg_acc", "bwt", "new_acc", "forgetting"),
    "digit_accs": TaskScore("digit_acc_matrix", "avg_digit_acc", "digit_bwt", "new_digit_acc", "digit_forgetting"),
    "answer_nlls": TaskScore("answer_nll_matrix", "avg_answer_nll", "answer_nll_bwt", "new_answer_nll",
                             "answer_nll_forgetting", lower_is_better=True),
}


def task_score_metrics(results: list[dict]) -> dict:
    """The matrices, averages and backward transfers of the per-task scores that the evaluations
    after each task (``results``) hold."""
    metrics = {}
    for key, score in TASK_SCORES.items():
        if results[0].get(key) is not None:
            matrix = [r[key] for r in results]
            metrics |= {score.matrix: matrix, score.average: average_accuracy(matrix),
                        score.bwt: backward_transfer(matrix), score.new_task: new_task_accuracy(matrix),
                        score.forgetting: forgetting(matrix, score.lower_is_better)}
    return metrics


# The scalars of a method's run that metrics.json summarises over seeds as [mean, standard error].
SUMMARY_KEYS = (*(name for score in TASK_SCORES.values()
                  for name in (score.average, score.bwt, score.new_task, score.forgetting)),
                "gen_retention", "gen_acc_last", "image_nll_last", "train_seconds")


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
