"""The human-readable outputs of a run: ``results.md`` and the plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_markdown(metrics: dict, pretrained_summary: str) -> str:
    tasks = metrics["tasks"]
    lines = [f"# Continual learning on `{metrics['benchmark']}`", "", pretrained_summary, ""]
    lines += ["## Comparison", "", "| method | avg acc | BWT | gen_acc (last) | gen retention | image NLL (last) "
              "| trainable params | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics["methods"].items():
        lines.append(f"| {name} | {m['avg_acc']:.3f} | {m['bwt']:+.3f} | {_number(m['gen_acc'][-1], '.3f')} | "
                     f"{_number(m['gen_retention'], '.3f')} | {_number(m['image_nll'][-1], '.4f')} | "
                     f"{m['trainable_params']} | {m['train_seconds']:.1f} |")
    for name, m in metrics["methods"].items():
        lines += ["", f"## {name}", "", "| after task | " + " | ".join(tasks) + " | gen_acc | image NLL |",
                  "|---" * (len(tasks) + 3) + "|"]
        for i, row in enumerate(m["acc_matrix"]):
            lines.append(f"| {tasks[i]} | " + " | ".join(f"{a:.3f}" for a in row) +
                         f" | {_number(m['gen_acc'][i], '.3f')} | {_number(m['image_nll'][i], '.4f')} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acc_matrices(output: Path, metrics: dict) -> None:
    """acc_matrix_<method>.png: accuracy on each task (columns) after training each task (rows)."""
    plt, tasks = _pyplot(), metrics["tasks"]
    for name, m in metrics["methods"].items():
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(np.array(m["acc_matrix"]), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training on")
        ax.set_title(f"{name}: accuracy")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(output / f"acc_matrix_{name}.png")
        plt.close(fig)


def plot_generation_curves(output: Path, metrics: dict) -> None:
    """gen_acc.png and image_nll.png: generation quality after each task, from the pretrained model on."""
    plt, tasks = _pyplot(), metrics["tasks"]
    for key, ylabel in (("gen_acc", "gen_acc"), ("image_nll", "image NLL (nats/code)")):
        if metrics["pretrained"][key] is None:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, m in metrics["methods"].items():
            ax.plot(range(len(tasks) + 1), [metrics["pretrained"][key]] + m[key], marker="o", label=name)
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
    """loss.png: each method's task cross-entropy (solid) and KD term (dashed) per step, tasks marked."""
    histories = {name: m["loss_history"] for name, m in metrics["methods"].items() if "loss_history" in m}
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
    models = {"pretrained": state["pretrained"], **state["done"]}
    plot_generated_digits(output, {name: m["samples"] for name, m in models.items() if "samples" in m})
    conflict = {name: m["conflict"] for name, m in metrics["methods"].items() if "conflict" in m}
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
