"""The training loop: for each method, from the same pretrained model, train the tasks in order
and evaluate every task and image generation after each (``run``); resumable at any step."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX
from ..kd import kd_loss, kd_positions
from ..kd_cache import ROW_IDS, TeacherCache
from ..modality import IMAGE
from ..workloads import Environment, Workload
from ..workloads.protocol import to_device
from ..workloads.schedule import cosine_lr
from . import distributed, interrupt, probe
from .adapter_export import export_adapters
from .adapting import build_model
from .config import RunError, TrainConfig, check_config, config_dict, workload_errors_as_run_errors
from .ewc import consolidate, ewc_penalty
from .jobs import Job, default_threads, run_jobs
from .kd_teacher import kd_slice, kd_teacher, load_teacher_cache
from .methods import METHODS, Method, trainable_params
from .metrics import metrics_json, retention, task_score_metrics
from .rehearsal import StepRows, step_rows
from .report import LossBoard, results_markdown, write_plots
from .resume import claim_output, load_adapters, load_progress, save_checkpoint


def wrap(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with --fsdp (in one process: the model itself)."""
    if not config.fsdp:
        return distributed.wrap_ddp(model)
    # bf16 halves the base's memory and all-gathers on GPUs; CPUs compute it slower than float32
    return distributed.wrap_fsdp2(model, base_dtype=torch.bfloat16 if device.type == "cuda" else None)


def step_seed(config: TrainConfig, task_index: int, step: int) -> list[int]:
    return [config.seed, task_index, step]


def draw_batch(rng: np.random.Generator, rows: list, collate: Callable[[list], dict], config: TrainConfig,
               device: torch.device) -> dict:
    """This process's share of a global batch of batch_size rows drawn by `rng` (the same draw
    on every process)."""
    picked = rng.integers(len(rows), size=config.batch_size)
    # each row's index in `rows` travels with it (the KD teacher cache looks rows up by it)
    batch = {**collate([rows[i] for i in picked]), ROW_IDS: torch.from_numpy(picked).long()}
    return to_device(distributed.shard_batch(batch), device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, workload: Workload, task_rows: StepRows,
               method: Method, config: TrainConfig, task_index: int, step: int, device: torch.device,
               teacher_cache: TeacherCache | None = None) -> dict:
    """One optimizer step (grad_accum micro-batches); data and dropout seeded by (seed, task, step).
    Returns the step's losses, means over its global batch: ``ce`` (the task's cross-entropy), ``kd``
    (the distillation term before kd_lambda; None without KD) and ``loss`` (what was minimised, with
    the EWC penalty of an EWC method). The KD teacher comes from ``teacher_cache``, else is computed."""
    rng = np.random.default_rng(step_seed(config, task_index, step))
    torch.manual_seed(int(rng.integers(2**62)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer.zero_grad(set_to_none=True)
    losses = {"loss": 0.0, "ce": 0.0, "kd": 0.0 if method.kd else None}
    for micro in range(config.grad_accum):
        last = micro + 1 == config.grad_accum
        # DDP: all-reduce the gradients once, in the last micro-batch's backward
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            batch = task_rows.draw(rng, workload.collate, config, device)
            # right padding under a causal mask: no attention mask needed (pads carry no loss)
            with autocast:
                pixels = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}  # Janus
                out = model(input_ids=batch["input_ids"], labels=batch["labels"], **pixels)
                # HF's loss is the mean over this process's targets; global_mean turns it into this
                # process's part of the global batch's mean, which DDP's gradient average then gives
                targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                ce = loss = distributed.global_mean(out.loss * targets, targets)
                if method.kd:
                    kd_batch = draw_batch(rng, workload.generation_rows, workload.collate, config, device)
                    if config.kd_routing == "image" and method.split_modality:
                        kd_batch["modality_ids"] = torch.full_like(kd_batch["input_ids"], IMAGE)
                    # the teacher pass needs the Hugging Face model, not the DDP wrapper
                    unwrapped = distributed.unwrap(model)
                    vocab_range = kd_slice(unwrapped, workload)
                    teacher = kd_teacher(unwrapped, kd_batch, teacher_cache, config, vocab_range)
                    kd_sum = kd_loss(unwrapped, kd_batch, teacher=teacher, topk_tail=config.kd_topk_tail,
                                     temperature=config.kd_temperature, vocab_range=vocab_range, reduction="sum")
                    kd = distributed.global_mean(kd_sum, kd_positions(kd_batch).sum())
                    loss = loss + config.kd_lambda * kd
                    losses["kd"] += distributed.all_reduce_mean(kd.detach().clone()).item() / config.grad_accum
                if method.ewc:
                    loss = loss + ewc_penalty(model, config.ewc_lambda)  # the same on every process
            (loss / config.grad_accum).backward()
        losses["loss"] += distributed.all_reduce_mean(loss.detach().clone()).item() / config.grad_accum
        losses["ce"] += distributed.all_reduce_mean(ce.detach().clone()).item() / config.grad_accum
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    return losses


def probe_step(model: nn.Module, workload: Workload, method: Method, config: TrainConfig, task_rows: StepRows,
               task_index: int, step: int, device: torch.device) -> dict:
    """The gradient-conflict cosines of this step, on batches from a stream of their own (the
    training draws stay as they are)."""
    rng = np.random.default_rng(step_seed(config, task_index, step) + [1])
    task_batch = task_rows.draw(rng, workload.collate, config, device)
    generation_batch = draw_batch(rng, workload.generation_rows, workload.collate, config, device)
    # The real image spec: a text-only method's own spec matches no token.
    cosines = probe.conflict_cosines(model, task_batch, generation_batch, spec=workload.spec,
                                     shared=not method.split_modality)
    return {"step": task_index * config.steps_per_task + step, "task": workload.task_names[task_index], **cosines}


def train_task(model: nn.Module, workload: Workload, method: Method, name: str, config: TrainConfig,
               task_index: int, current: dict, state: dict, checkpoint_path: Path, device: torch.device,
               progress: bool, board: LossBoard, teacher_cache: TeacherCache | None = None) -> None:
    """Train task ``task_index`` from step ``current["step"]``, checkpointing every checkpoint_every steps;
    each step's losses go to ``current["loss_history"]`` (kept in the checkpoint) and ``board``."""
    rows = step_rows(workload, method, config, task_index)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if current["step"]:
        load_adapters(checkpoint_path, model, optimizer)  # saved mid-task: adapters and this task's optimizer
    warmup = max(1, int(config.warmup_fraction * config.steps_per_task))
    model.train()
    bar = tqdm(range(current["step"], config.steps_per_task), desc=f"{name} {workload.task_names[task_index]}",
               disable=not progress, initial=current["step"], total=config.steps_per_task)
    for step in bar:
        if config.probe_conflict and step % config.probe_conflict == 0:
            current.setdefault("conflict", []).append(
                probe_step(model, workload, method, config, rows, task_index, step, device))
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.steps_per_task, warmup, config.lr)
        losses = train_step(model, optimizer, workload, rows, method, config, task_index, step, device, teacher_cache)
        current["train_seconds"] += time.perf_counter() - start
        for key in ("ce", "kd"):
            current["loss_history"][key].append(losses[key])
        board.add_losses(name, task_index * config.steps_per_task + step, losses)
        bar.set_postfix(loss=f"{losses['loss']:.3f}")
        stop = interrupt.requested()
        if stop or (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps_per_task:
            current["step"] = step + 1  # (all of them on a stop after the last step: resuming evaluates)
            save_checkpoint(checkpoint_path, model, optimizer, extra=state | {"current": current})
        if stop:
            raise interrupt.Interrupted(stop)


def method_results(model: nn.Module, workload: Workload, method: Method, name: str, current: dict, state: dict,
                   output: Path) -> dict:
    """What metrics.json keeps of a finished method."""
    results = current["results"]
    return {
        **task_score_metrics(results),
        "gen_acc": [r["gen_acc"] for r in results],
        "gen_retention": retention(results[-1]["gen_acc"], state["pretrained"]["gen_acc"]),
        "image_nll": [r["image_nll"] for r in results],
        "train_seconds": current["train_seconds"],
        "loss_history": current["loss_history"],
        "trainable_params": trainable_params(model, method),
        **({"conflict": current["conflict"]} if "conflict" in current else {}),
        **workload.finish(distributed.unwrap(model), name, output),
    }


def run_label(name: str, config: TrainConfig) -> str:
    """How a method's run is named in logs and files: the method, and its seed when there are several."""
    return name if len(config.run_seeds) == 1 else f"{name}-seed{config.seed}"


def run_method(name: str, workload: Workload, config: TrainConfig, device: torch.device, output: Path, state: dict,
               progress: bool, board: LossBoard, checkpoint_path: Path | None = None, label: str | None = None,
               teacher_cache: TeacherCache | None = None) -> None:
    """Train the tasks of one method in order with ``config.seed``, continuing from
    `state["current"]` if it is this method and seed; its results go to ``state["done"][name][seed]``.
    Its resume state goes to ``checkpoint_path`` (default DIR/checkpoint; ``--jobs``: the run's own); its KD
    teacher comes from ``teacher_cache`` if given."""
    method, label = METHODS[name], label or run_label(name, config)
    checkpoint_path = checkpoint_path or output / "checkpoint"
    model = wrap(build_model(workload, method, config, device), config, device)
    if state["pretrained"] is None:
        # Fresh adapters (lora_B = 0) leave the model's function as it is: this is the pretrained
        # model, as this run computes it (with --fsdp on GPUs its base in bf16).
        state["pretrained"] = workload.evaluate_pretrained(distributed.unwrap(model))
    current = state["current"]
    if current is not None and (current["method"], current["seed"]) == (name, config.seed):
        if current["step"] == 0:
            load_adapters(checkpoint_path, model)  # saved at a task boundary: adapters only
    else:
        current = {"method": name, "seed": config.seed, "task": 0, "step": 0, "results": [], "train_seconds": 0.0,
                   "loss_history": {"ce": [], "kd": []}}
    for task_index in range(current["task"], len(workload.task_names)):
        train_task(model, workload, method, label, config, task_index, current, state, checkpoint_path, device,
                   progress, board, teacher_cache)
        current["results"].append(workload.evaluate(distributed.unwrap(model)))
        board.add_evaluation(label, (task_index + 1) * config.steps_per_task, workload.task_names,
                             current["results"][-1])
        if method.ewc:  # before the task-boundary checkpoint, which then carries the new penalty
            consolidate(model, workload.task_rows(task_index), workload.collate, config.ewc_samples,
                        [config.seed, task_index, 3])
        current.update(task=task_index + 1, step=0)
        save_checkpoint(checkpoint_path, model, extra=state | {"current": current})
        if stop := interrupt.requested():  # during the evaluation: the checkpoint above is the safe point
            raise interrupt.Interrupted(stop)
    results = method_results(model, workload, method, label, current, state, output)
    results["adapters"] = str(export_adapters(model, output, label, method.plain_lora).relative_to(output))
    state["done"].setdefault(name, {})[str(config.seed)] = results
    state["current"] = None
    save_checkpoint(checkpoint_path, model, extra=state)
    if stop := interrupt.requested():
        raise interrupt.Interrupted(stop)


def load_workload(config: TrainConfig, device: torch.device, cache_dir: str | Path | None,
                  progress: bool) -> Workload:
    """The run's workload, from its options in ``config``."""
    factory = config.workload
    options = factory.options(**{f.name: getattr(config, f.name) for f in fields(factory.options)})
    environment = Environment(device, cache_dir, progress, is_main=distributed.is_main, barrier=distributed.barrier)
    return factory.create(options, config.settings(config.seed), environment)


@workload_errors_as_run_errors()
def run_job(job: Job) -> tuple[dict, float]:
    """In a ``--jobs`` worker process: the job's run, resumed from its own checkpoint if it has one;
    (its results, wall seconds)."""
    start = time.perf_counter()
    torch.set_num_threads(job.threads)
    config = job.config
    path = job.checkpoint_path
    state = (load_progress(path, config) if path.exists() else
             {"config": config_dict(config), "pretrained": job.pretrained, "done": {}, "current": None})
    workload = load_workload(config, torch.device(job.device), job.cache_dir, progress=False)
    # the parent computed the cache before spawning: this reads its file
    teacher_cache = (load_teacher_cache(workload, config, torch.device(job.device), job.cache_dir, progress=False,
                                        report=False) if METHODS[job.method].kd else None)
    with LossBoard(job.output if config.report_to == "tensorboard" else None) as board:
        run_method(job.method, workload, config, torch.device(job.device), job.output, state, progress=False,
                   board=board, checkpoint_path=path, label=job.label, teacher_cache=teacher_cache)
    return state["done"][job.method][str(config.seed)], time.perf_counter() - start


def evaluate_pretrained(workload: Workload, config: TrainConfig, device: torch.device) -> dict:
    """The pretrained model's scores as the serial loop takes them: on the first method's model, built with
    ``config.seed`` (fresh adapters leave the model's function as it is)."""
    model = wrap(build_model(workload, METHODS[config.methods[0]], config, device), config, device)
    return workload.evaluate_pretrained(distributed.unwrap(model))


@workload_errors_as_run_errors()
def run(config: TrainConfig, output: Path, resume: bool = False, device: str = "cpu",
        cache_dir: str | Path | None = None, progress: bool = True, overwrite: bool = False, jobs: int = 1,
        threads: int | None = None) -> dict:
    """Run every method of `config`, write the results to `output` (rank 0), and return metrics.json's content.
    An `output` holding a checkpoint or results needs `resume` (continue it) or `overwrite` (delete them first).

    ``jobs`` > 1 runs the method × seed runs in that many worker processes (``mode.train.jobs``), each with
    ``threads`` torch threads (default: the cores shared among them); ``threads`` also sets this process's.
    Under torchrun every process calls it; it joins the process group (`mode.train.distributed.init`).
    Within `interrupt.stop_at_safe_points()` a signal stops it after the current step, with a checkpoint
    there (`interrupt.Interrupted`).
    """
    distributed.init()
    check_config(config)
    if jobs < 1:
        raise RunError(f"--jobs {jobs}: expected a number of worker processes >= 1")
    if threads is not None and threads < 1:
        raise RunError(f"--threads {threads}: expected a number of torch threads >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    if distributed.is_distributed():
        device = distributed.device()  # this process's GPU, or the CPU under gloo
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    progress = progress and distributed.is_main()
    config_path, checkpoint_path = output / "config.json", output / "checkpoint"
    config_json = json.dumps(asdict(config), indent=2, sort_keys=True)
    claim_output(output, config_json, resume, overwrite)
    state = load_progress(checkpoint_path, config) if resume and checkpoint_path.exists() else None
    workload = load_workload(config, device, cache_dir, progress)
    distributed.atomic_write_text(config_path, config_json)
    if state is None:
        state = {"config": config_dict(config), "pretrained": None, "done": {}, "current": None}
    # every method of a seed, then the next seed: one seed's table comes first
    pending = [(seed, name) for seed in config.run_seeds for name in config.methods
               if str(seed) not in state["done"].get(name, {})]
    kd_pending = any(METHODS[name].kd for _, name in pending)
    teacher_cache = load_teacher_cache(workload, config, device, cache_dir, progress) if kd_pending else None
    if jobs > 1 and pending:
        if state["pretrained"] is None:
            workload.settings = config.settings(config.run_seeds[0])
            state["pretrained"] = evaluate_pretrained(workload, replace(config, seed=config.run_seeds[0]), device)
        run_jobs(config, state, pending, output, device, cache_dir, jobs, threads or default_threads(jobs),
                 label=lambda name, seed: run_label(name, replace(config, seed=seed)),
                 save_state=lambda: save_checkpoint(checkpoint_path, nn.Module(), extra=state), worker=run_job)
    else:
        with LossBoard(output if config.report_to == "tensorboard" and distributed.is_main() else None) as board:
            for seed, name in pending:
                workload.settings = config.settings(seed)  # the workload seeds its sampling from it
                run_method(name, workload, replace(config, seed=seed), device, output, state, progress, board,
                           teacher_cache=teacher_cache)

    metrics = metrics_json(state, workload.name, workload.task_names, config.run_seeds)
    distributed.atomic_write_json(output / "metrics.json", metrics)
    summary = workload.summary(state["pretrained"])
    distributed.atomic_write_text(output / "results.md", results_markdown(metrics, summary))
    if distributed.is_main():
        write_plots(output, state, metrics)
    return metrics
