"""The human-readable outputs of a run: ``results.md`` and the plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import mean_matrix


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean_se(summary: dict, key: str, spec: str) -> str:
    """"mean ± se" of a summary entry ("mean" alone for one seed, "-" when the runs lack it)."""
    entry = summary.get(key)
    if entry is None:
        return "-"
    mean, se = entry
    return format(mean, spec) + ("" if se is None else " ± " + format(se, spec.lstrip("+")))


# the comparison table: (column, summary key, format)
COMPARISON = (("avg acc", "avg_acc", ".3f"), ("BWT", "bwt", "+.3f"), ("new-task acc", "new_acc", ".3f"),
              ("forgetting", "forgetting", "+.3f"), ("avg digit acc", "avg_digit_acc", ".3f"),
              ("digit BWT", "digit_bwt", "+.3f"), ("digit forgetting", "digit_forgetting", "+.3f"),
              ("avg answer NLL", "avg_answer_nll", ".3f"), ("answer NLL BWT", "answer_nll_bwt", "+.3f"),
              ("answer NLL forgetting", "answer_nll_forgetting", "+.3f"), ("gen_acc (last)", "gen_acc_last", ".3f"),
              ("gen retention", "gen_retention", ".3f"),
              ("image NLL (last; nats per code, whole vocabulary)", "image_nll_last", ".4f"))
# the per-method tables: (title, matrix, format)
MATRICES = (("exact match", "acc_matrix", ".3f"), ("digit named right (first answer word)", "digit_acc_matrix", ".3f"),
            ("answer NLL (teacher-forced, nats per answer token, on the logits the model trains on: the scale of its "
             "training loss; lower is better)", "answer_nll_matrix", ".3f"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def results_markdown(metrics: dict, pretrained_summary: str) -> str:
    tasks, seeds = metrics["tasks"], metrics["seeds"]
    over = f"mean ± standard error over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    columns = [c for c in COMPARISON if any(m["summary"].get(c[1]) is not None for m in metrics["methods"].values())]
    lines = [f"# Continual learning on `{metrics['benchmark']}`", "", pretrained_summary, "",
             f"## Comparison ({over})", "",
             "| method | " + " | ".join(c[0] for c in columns) + " | trainable params | train s |",
             "|---" * (len(columns) + 3) + "|"]
    for name, m in metrics["methods"].items():
        cells = [_mean_se(m["summary"], key, spec) for _, key, spec in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['per_seed'][0]['trainable_params']} | "
                     f"{_mean_se(m['summary'], 'train_seconds', '.1f')} |")
    for name, m in metrics["methods"].items():
        per_seed = m["per_seed"]
        lines += ["", f"## {name}" + ("" if len(seeds) == 1 else f" (means over {len(seeds)} seeds)")]
        for title, key, spec in MATRICES:
            matrix = mean_matrix(per_seed, key)
            if matrix is None:
                continue
            lines += ["", f"{title}:", ""] + _table(["after task", *tasks],
                                                    [[tasks[i], *(format(a, spec) for a in row)]
                                                     for i, row in enumerate(matrix)])
        generation = {key: np.mean([r[key] for r in per_seed], axis=0).tolist()
                      for key in ("gen_acc", "image_nll") if per_seed[0][key][0] is not None}
        if generation:
            lines += ["", "generation after each task:", ""] + _table(
                ["after task", *generation], [[task, *(format(v[i], ".4f") for v in generation.values())]
                                              for i, task in enumerate(tasks)])
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acc_matrices(output: Path, metrics: dict) -> None:
    """acc_matrix_<method>.png: each per-task score (exact match, and where the workload has them the
    digit named right and the answer NLL) on each task (columns) after training each task (rows),
    averaged over seeds."""
    plt, tasks = _pyplot(), metrics["tasks"]
    for name, m in metrics["methods"].items():
        panels = [(title, matrix) for title, key, _ in MATRICES
                  if (matrix := mean_matrix(m["per_seed"], key)) is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (title, matrix) in zip(axes[0], panels):
            nll = "NLL" in title
            im = ax.imshow(np.array(matrix), vmin=0, vmax=None if nll else 1, cmap="magma_r" if nll else "viridis")
            ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
            ax.set_yticks(range(len(tasks)), tasks)
            ax.set_xlabel("evaluated task")
            ax.set_ylabel("after training on")
            ax.set_title(f"{name}: {title.split(' (')[0]}", fontsize="small")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(output / f"acc_matrix_{name}.png")
        plt.close(fig)


def plot_generation_curves(output: Path, metrics: dict) -> None:
    """gen_acc.png and image_nll.png: generation quality after each task, from the pretrained model on
    (mean over seeds, the standard error as error bars)."""
    plt, tasks = _pyplot(), metrics["tasks"]
    for key, ylabel in (("gen_acc", "gen_acc"), ("image_nll", "image NLL (nats/code)")):
        if metrics["pretrained"][key] is None:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, m in metrics["methods"].items():
            curves = np.array([[metrics["pretrained"][key]] + r[key] for r in m["per_seed"]])
            se = curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else None
            ax.errorbar(range(len(tasks) + 1), curves.mean(axis=0), yerr=se, marker="o", capsize=3, label=name)
        ax.set_xticks(range(len(tasks) + 1), ["pretrained"] + tasks, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / f"{key}.png")
        plt.close(fig)


def plot_generated_digits(output: Path, rows: dict[str, list]) -> None:
    """generated_digits.png: one "draw a d" per digit (columns) per model (rows: the pretrained
    model first, then each method after its last task)."""
    if not rows:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.2 * len(rows)), squeeze=False)
    for row, (name, samples) in enumerate(rows.items()):
        for digit in range(10):
            ax = axes[row][digit]
            ax.imshow(np.array(samples[digit]), cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([])
            ax.set_yticks([])
            if digit == 0:
                ax.set_ylabel(name)
    fig.suptitle("draw a 0..9: the pretrained model, then each method after the last task")
    fig.tight_layout()
    fig.savefig(output / "generated_digits.png")
    plt.close(fig)


def plot_losses(output: Path, metrics: dict) -> None:
    """loss.png: each method's task cross-entropy (solid) and KD term (dashed) per step, tasks marked
    (the first seed's run)."""
    histories = {name: m["per_seed"][0]["loss_history"] for name, m in metrics["methods"].items()}
    if not histories:
        return
    plt, tasks = _pyplot(), metrics["tasks"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = 0
    for index, (name, history) in enumerate(histories.items()):
        color = f"C{index}"
        steps = max(steps, len(history["ce"]))
        ax.plot(history["ce"], color=color, label=f"{name} CE")
        if any(v is not None for v in history["kd"]):
            ax.plot(history["kd"], color=color, linestyle="--", label=f"{name} KD")
    per_task = steps // max(len(tasks), 1)
    for t in range(1, len(tasks)):
        ax.axvline(t * per_task, color="gray", linewidth=0.5)
    ax.set_xticks([t * per_task + per_task / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("loss (nats)")
    ax.set_title("training losses per step")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(output / "loss.png")
    plt.close(fig)


def write_plots(output: Path, state: dict, metrics: dict) -> None:
    from .probe import plot_conflict

    plot_acc_matrices(output, metrics)
    plot_generation_curves(output, metrics)
    plot_losses(output, metrics)
    first_seed = str(metrics["seeds"][0])
    models = {"pretrained": state["pretrained"], **{name: runs[first_seed] for name, runs in state["done"].items()}}
    plot_generated_digits(output, {name: m["samples"] for name, m in models.items() if "samples" in m})
    conflict = {name: m["per_seed"][0]["conflict"] for name, m in metrics["methods"].items()
                if "conflict" in m["per_seed"][0]}
    if conflict:
        plot_conflict(conflict, output / "conflict.png")


class LossBoard:
    """``--report-to tensorboard``: each step's losses and each evaluation as TensorBoard scalars in
    DIR/tensorboard (a context manager; does nothing without a directory)."""

    def __init__(self, output: Path | None):
        self.writer = None
        if output is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from err
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def add_losses(self, method: str, step: int, losses: dict) -> None:
        if self.writer is not None:
            for key, value in losses.items():
                if value is not None:
                    self.writer.add_scalar(f"{method}/{key}", value, step)

    def add_evaluation(self, method: str, step: int, task_names: list[str], results: dict) -> None:
        if self.writer is not None:
            for task, acc in zip(task_names, results["accs"]):
                self.writer.add_scalar(f"{method}/acc/{task}", acc, step)
            for key in ("gen_acc", "image_nll"):
                if results.get(key) is not None:
                    self.writer.add_scalar(f"{method}/{key}", results[key], step)

    def __enter__(self) -> LossBoard:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
