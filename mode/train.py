"""Continual fine-tuning of a unified multimodal model on a sequence of understanding tasks.

    python -m mode.train --benchmark digits --methods mode,lora --output runs/digits

For each method, starting from the same pretrained model (`mode.digits_model`), train the
tasks of the benchmark in order; after each task evaluate every task (exact match) and image
generation (gen_acc, image_nll). Writes to the output directory:
    metrics.json   acc matrix, avg_acc, bwt, gen_acc / image_nll after each task, per method
    results.md     a table per method and a comparison table
    *.png          accuracy matrices, gen_acc after each task, generated digits after the last task
    checkpoint.pt  the latest state (after each task and every --checkpoint-every steps); --resume

Methods (same rank, steps, lr and data order for all; adapters on gate/up/down_proj):
    mode       4 text LoRA experts + 1 image LoRA, routed by modality, + KD from the frozen model
               on the generation stream (lambda 0.3, T 2)
    mode-nokd  the same without KD (ablation)
    lora       one LoRA for all tokens
    moelora    the 4-expert text-style mixture for all tokens (no modality split)
Text-only methods route every token as text: their modality spec's image range lies past the
vocabulary, so no token is an image token and the image expert stays idle (not counted in
trainable_params).

Resuming is exact: the batch of each step and its dropout draws are seeded by
(seed, task, step), so a run killed and resumed ends with the same metrics as one that was not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import mode
from mode import digits
from mode import digits_model as dm

BENCHMARKS = ("digits",)


@dataclass(frozen=True)
class Method:
    experts_per_modality: tuple[int, int]  # (text experts, image experts)
    split_modality: bool  # False: every token is routed as text
    kd: bool  # distil the frozen model on the generation stream


METHODS = {
    "mode": Method((4, 1), split_modality=True, kd=True),
    "mode-nokd": Method((4, 1), split_modality=True, kd=False),
    "lora": Method((1, 1), split_modality=False, kd=False),
    "moelora": Method((4, 1), split_modality=False, kd=False),
}


@dataclass
class TrainConfig:
    """Everything that determines the results of a run (stored in DIR/config.json)."""
    benchmark: str = "digits"
    methods: tuple[str, ...] = ("mode", "lora")
    seed: int = 0
    steps_per_task: int = 60
    batch_size: int = 16  # per micro-batch
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    kd_lambda: float = 0.3
    kd_temperature: float = 2.0
    eval_size: int = 200  # test images per evaluation (tasks and image NLL)
    gen_samples_per_digit: int = 20
    gen_temperature: float = dm.GenerationConfig.temperature
    pretrain_steps: int = dm.PretrainConfig.steps
    checkpoint_every: int = 20


class RunError(Exception):
    """Bad input: reported as a clear message, nothing overwritten."""


# ----------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------- files

def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: Path, state: dict) -> None:
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, config: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "config" not in state or "done" not in state:
            raise ValueError("not a mode.train checkpoint")
    except Exception as err:
        raise RunError(f"corrupt checkpoint {path} ({type(err).__name__}: {err}); delete it to start over") from err
    if state["config"] != asdict(config):
        raise RunError(f"checkpoint {path} was written by a run with another config")
    return state


# ----------------------------------------------------------------------------- training

def lora_model(base_state: dict, pretrained: dm.Pretrained, method: Method, config: TrainConfig, device):
    """A fresh copy of the pretrained model with the method's adapters."""
    vocab = pretrained.vocab
    torch.manual_seed(config.seed)  # the adapters' init
    model = dm.build_model(vocab, pretrained.model_config)
    model.load_state_dict(base_state)
    if method.split_modality:
        spec = mode.ModalitySpec(**vocab.modality_spec_args())
    else:
        spec = mode.ModalitySpec(image_token_ranges=((len(vocab), len(vocab) + 1),))  # matches no token
    mode_config = mode.MoDEConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                  experts_per_modality=method.experts_per_modality, modality=spec,
                                  kd_temperature=config.kd_temperature,
                                  kd_vocab_range=vocab.image_code_range)
    return mode.apply_mode(model, mode_config).to(device)


def trainable_params(model, method: Method) -> int:
    """Adapter parameters that can receive a gradient under the method's routing: the image
    expert only if tokens reach it, router rows only of a modality with several experts."""
    text, image = method.experts_per_modality
    used_experts = text + image if method.split_modality else text
    routed_modalities = [n for n in ((text, image) if method.split_modality else (text,)) if n > 1]
    total = 0
    for module in model.modules():
        if isinstance(module, mode.MoDELinear):
            k, n, r = module.in_features, module.out_features, module.rank
            total += used_experts * r * (k + n) + sum(routed_modalities) * k
    return total


def step_seed(config: TrainConfig, task_index: int, step: int) -> list[int]:
    return [config.seed, task_index, step]


def train_step(model, optimizer, task_examples, generation_examples, pad_id, method: Method,
               config: TrainConfig, task_index: int, step: int, device) -> float:
    """One optimizer step (grad_accum micro-batches); data and dropout seeded by (seed, task, step)."""
    rng = np.random.default_rng(step_seed(config, task_index, step))
    torch.manual_seed(int(rng.integers(2**62)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(config.grad_accum):
        batch = digits.collate([task_examples[i] for i in rng.integers(len(task_examples), size=config.batch_size)],
                               pad_id)
        # right padding under a causal mask: no attention mask needed (pads carry no loss)
        with autocast:
            loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
            if method.kd:
                rows = rng.integers(len(generation_examples), size=config.batch_size)
                kd_batch = digits.collate([generation_examples[i] for i in rows], pad_id)
                kd_batch = {k: v.to(device) for k, v in kd_batch.items()}
                loss = loss + config.kd_lambda * mode.kd_loss(model, kd_batch)
        (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    return total


def evaluate(model, pretrained: dm.Pretrained, classifier, config: TrainConfig, progress: bool) -> dict:
    """Accuracy on every continual task and generation quality, on the first eval_size test images."""
    vocab, test = pretrained.vocab, eval_split(pretrained.data, config)
    accs = [dm.task_accuracy(model, vocab, task, test.test_images, test.test_labels, progress=progress)
            for task in digits.CONTINUAL_TASKS]
    return {"accs": accs, **dm.evaluate_generation(model, vocab, test, classifier, generation_config(config), progress)}


def eval_split(data: digits.DigitsData, config: TrainConfig) -> digits.DigitsData:
    """The data with only the first eval_size test images (evaluation runs after every task)."""
    return replace(data, test_images=data.test_images[: config.eval_size], test_labels=data.test_labels[: config.eval_size])


def generation_config(config: TrainConfig) -> dm.GenerationConfig:
    return dm.GenerationConfig(config.gen_samples_per_digit, config.gen_temperature, config.seed)


def run_method(name: str, pretrained, base_state, classifier, config: TrainConfig, device, checkpoint_path: Path,
               state: dict, progress: bool) -> None:
    """Train the tasks of one method in order, continuing from `state["current"]` if it is this method."""
    method = METHODS[name]
    vocab, data = pretrained.vocab, pretrained.data
    model = lora_model(base_state, pretrained, method, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    generation_stream = digits.generation_examples(vocab, data.train_images, data.train_labels)
    current = state.get("current")
    if current is None or current["method"] != name:
        current = {"method": name, "task": 0, "step": 0, "adapters": None, "optimizer": None,
                   "results": [], "train_seconds": 0.0}
    else:
        model.load_state_dict(current["adapters"], strict=False)
    for task_index, task in enumerate(digits.CONTINUAL_TASKS):
        if task_index < current["task"]:
            continue
        examples = digits.task_examples(vocab, task, data.train_images, data.train_labels)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        if current["optimizer"] is not None:
            optimizer.load_state_dict(current["optimizer"])
        warmup = max(1, int(config.warmup_fraction * config.steps_per_task))
        model.train()
        bar = tqdm(range(current["step"], config.steps_per_task), desc=f"{name} {task.name}", disable=not progress,
                   initial=current["step"], total=config.steps_per_task)
        for step in bar:
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = dm.cosine_lr(step, config.steps_per_task, warmup, config.lr)
            loss = train_step(model, optimizer, examples, generation_stream, vocab.pad, method, config,
                              task_index, step, device)
            current["train_seconds"] += time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.3f}")
            finished = step + 1 == config.steps_per_task
            if (step + 1) % config.checkpoint_every == 0 and not finished:
                current.update(step=step + 1, adapters=_adapters(model), optimizer=optimizer.state_dict())
                save_checkpoint(checkpoint_path, state | {"current": current})
        result = evaluate(model, pretrained, classifier, config, progress)
        current["results"].append(result)
        current.update(task=task_index + 1, step=0, adapters=_adapters(model), optimizer=None)
        save_checkpoint(checkpoint_path, state | {"current": current})
    results = current["results"]
    acc_matrix = [r["accs"] for r in results]
    pretrained_gen_acc = state["pretrained"]["gen_acc"]
    state["done"][name] = {
        "acc_matrix": acc_matrix,
        "avg_acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "gen_acc": [r["gen_acc"] for r in results],
        "gen_retention": results[-1]["gen_acc"] / pretrained_gen_acc if pretrained_gen_acc else 0.0,
        "image_nll": [r["image_nll"] for r in results],
        "train_seconds": current["train_seconds"],
        "trainable_params": trainable_params(model, method),
        # one "draw a d" per digit after the last task, for the plot
        "samples": dm.sample_images(model, vocab, np.arange(10), config.gen_temperature, config.seed),
    }
    state["current"] = None
    save_checkpoint(checkpoint_path, state)


def _adapters(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


# ----------------------------------------------------------------------------- reports

def metrics_json(state: dict, config: TrainConfig) -> dict:
    return {
        "benchmark": config.benchmark,
        "tasks": [t.name for t in digits.CONTINUAL_TASKS],
        "pretrained": {k: state["pretrained"][k] for k in ("gen_acc", "image_nll")},
        "methods": {name: {k: v for k, v in m.items() if k != "samples"} for name, m in state["done"].items()},
    }


def results_markdown(metrics: dict, extra: dict) -> str:
    tasks = metrics["tasks"]
    lines = [f"# Continual learning on `{metrics['benchmark']}`", ""]
    lines += [f"Pretrained model: gen_acc {metrics['pretrained']['gen_acc']:.3f}, image NLL "
              f"{metrics['pretrained']['image_nll']:.4f} nats/code; understanding (digit) acc "
              f"{extra['digit_acc']:.3f}; judge classifier test acc {extra['classifier_acc']:.3f}.", ""]
    lines += ["## Comparison", "", "| method | avg acc | BWT | gen_acc (last) | gen retention | image NLL (last) "
              "| trainable params | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics["methods"].items():
        lines.append(f"| {name} | {m['avg_acc']:.3f} | {m['bwt']:+.3f} | {m['gen_acc'][-1]:.3f} | "
                     f"{m['gen_retention']:.3f} | {m['image_nll'][-1]:.4f} | {m['trainable_params']} | "
                     f"{m['train_seconds']:.1f} |")
    for name, m in metrics["methods"].items():
        lines += ["", f"## {name}", "", "| after task | " + " | ".join(tasks) + " | gen_acc | image NLL |",
                  "|---" * (len(tasks) + 3) + "|"]
        for i, row in enumerate(m["acc_matrix"]):
            lines.append(f"| {tasks[i]} | " + " | ".join(f"{a:.3f}" for a in row) +
                         f" | {m['gen_acc'][i]:.3f} | {m['image_nll'][i]:.4f} |")
    return "\n".join(lines) + "\n"


def write_plots(output: Path, state: dict, metrics: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics["tasks"]
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
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in metrics["methods"].items():
        ax.plot(range(len(tasks) + 1), [metrics["pretrained"]["gen_acc"]] + m["gen_acc"], marker="o", label=name)
    ax.set_xticks(range(len(tasks) + 1), ["pretrained"] + tasks, rotation=30, ha="right")
    ax.set_ylabel("gen_acc")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "gen_acc.png")
    plt.close(fig)
    names = list(state["done"])
    fig, axes = plt.subplots(len(names), 10, figsize=(10, 1.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for digit in range(10):
            ax = axes[row][digit]
            ax.imshow(state["done"][name]["samples"][digit], cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([])
            ax.set_yticks([])
            if digit == 0:
                ax.set_ylabel(name)
    fig.suptitle("draw a 0..9, after the last task")
    fig.tight_layout()
    fig.savefig(output / "generated_digits.png")
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def run(config: TrainConfig, output: Path, resume: bool = False, device: str = "cpu", cache_dir=None,
        progress: bool = True) -> dict:
    """Run every method of `config`, write the results to `output`, and return metrics.json's content."""
    if config.benchmark not in BENCHMARKS:
        raise RunError(f"unknown benchmark {config.benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise RunError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    output.mkdir(parents=True, exist_ok=True)
    config_path, checkpoint_path = output / "config.json", output / "checkpoint.pt"
    config_json = json.dumps(asdict(config), indent=2, sort_keys=True)
    if config_path.exists() and json.loads(config_path.read_text()) != json.loads(config_json):
        raise RunError(f"{output} holds another run (its config.json differs); choose another --output")
    state = load_checkpoint(checkpoint_path, config) if resume and checkpoint_path.exists() else None
    atomic_write_bytes(config_path, config_json.encode())

    device = torch.device(device)
    pretrained = dm.load_or_pretrain(pretrain_config=replace(dm.PretrainConfig(), steps=config.pretrain_steps),
                                     cache_dir=cache_dir, progress=progress)
    base_state = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    classifier = dm.fit_digit_classifier(pretrained.data)
    if state is None:
        model = pretrained.model.to(device)
        test = eval_split(pretrained.data, config)
        gen = dm.evaluate_generation(model, pretrained.vocab, test, classifier, generation_config(config), progress)
        digit_acc = dm.task_accuracy(model, pretrained.vocab, digits.DIGIT, test.test_images, test.test_labels,
                                     progress=progress)
        state = {"config": asdict(config), "pretrained": {**gen, "digit_acc": digit_acc}, "done": {}, "current": None}
        save_checkpoint(checkpoint_path, state)
    for name in config.methods:
        if name not in state["done"]:
            run_method(name, pretrained, base_state, classifier, config, device, checkpoint_path, state, progress)

    metrics = metrics_json(state, config)
    atomic_write_bytes(output / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    extra = {"digit_acc": state["pretrained"]["digit_acc"], "classifier_acc": classifier.test_accuracy}
    atomic_write_bytes(output / "results.md", results_markdown(metrics, extra).encode())
    write_plots(output, state, metrics)
    return metrics


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="mode-train", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", default=defaults.benchmark, help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--methods", default=",".join(defaults.methods), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--output", required=True, type=Path, help="directory for metrics, tables, plots, checkpoint")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps-per-task", type=int, default=defaults.steps_per_task)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--eval-size", type=int, default=defaults.eval_size, help="test images per evaluation")
    p.add_argument("--gen-samples", type=int, default=defaults.gen_samples_per_digit, help="sampled images per digit")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=None, help="pretrained-model cache (default $MODE_CACHE_DIR or ~/.cache/mode-kernels)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = replace(defaults, benchmark=args.benchmark, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                     seed=args.seed, steps_per_task=args.steps_per_task, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, lr=args.lr, eval_size=args.eval_size,
                     gen_samples_per_digit=args.gen_samples, pretrain_steps=args.pretrain_steps,
                     checkpoint_every=args.checkpoint_every)
    return config, args


def main(argv=None) -> int:
    config, args = parse_args(argv)
    try:
        metrics = run(config, args.output, resume=args.resume, device=args.device, cache_dir=args.cache_dir,
                      progress=not args.no_progress)
    except RunError as err:
        print(f"mode-train: error: {err}", file=sys.stderr)
        return 2
    print((args.output / "results.md").read_text())
    return 0 if metrics else 1


if __name__ == "__main__":
    sys.exit(main())
