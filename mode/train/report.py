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


def write_plots(output: Path, state: dict, metrics: dict) -> None:
    from .probe import plot_conflict

    plot_acc_matrices(output, metrics)
    plot_generation_curves(output, metrics)
    models = {"pretrained": state["pretrained"], **state["done"]}
    plot_generated_digits(output, {name: m["samples"] for name, m in models.items() if "samples" in m})
    conflict = {name: m["conflict"] for name, m in metrics["methods"].items() if "conflict" in m}
    if conflict:
        plot_conflict(conflict, output / "conflict.png")
