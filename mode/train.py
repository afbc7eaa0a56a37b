"""Continual fine-tuning of a unified multimodal model on a sequence of understanding tasks.

    python -m mode.train --benchmark digits --methods mode,lora --output runs/digits
    python -m mode.train --model /ckpt/anole-7b-hf --modality chameleon --data a.jsonl,b.jsonl \\
        --eval-data a_test.jsonl,b_test.jsonl --gen-data generation.jsonl --output runs/anole
    torchrun --nproc_per_node=8 -m mode.train ...        # DDP; --fsdp: FSDP2 (bf16 base on GPUs)

For each method, starting from the same pretrained model, train the tasks in order; after each
task evaluate every task (exact match) and image generation. Model and tasks come from
    --benchmark digits  the tiny pretrained digits model (`mode.digits_model`) and its four
                        continual tasks; generation scored by gen_acc (a classifier judges the
                        sampled digits) and image_nll on test images
    --model PATH        a local Hugging Face checkpoint (`mode.checkpoints`; --modality names its
                        image tokens) and pre-tokenized JSON Lines (`mode.jsonl_data`): tasks
                        from --data (a task per file or per "task" field), exact match on
                        --eval-data (default --data; held-out tasks matched by name, so
                        test/gqa.jsonl for gqa.jsonl), image_nll on the first --eval-size records
                        of --gen-data (the generation stream MoDE distils on); after the last task
                        one image per --gen-prompts file (codes; a PNG needs a VQ decoder, which
                        transformers' Chameleon lacks). Bad records: --on-bad-record refuse|skip.
Writes to the output directory (under torchrun: rank 0 only):
    metrics.json   acc matrix, avg_acc, bwt, gen_acc / image_nll after each task, per method
                   (and the gradient-conflict cosines with --probe-conflict)
    results.md     a table per method and a comparison table
    *.png          accuracy matrices, generation quality after each task, generated digits after
                   the last task (digits), conflict.png (--probe-conflict)
    images/        --gen-prompts: images/METHOD/PROMPT.image_tokens.json
    checkpoint/    the latest state, a torch.distributed.checkpoint directory (after each task
                   and every --checkpoint-every steps); --resume continues from it with any
                   number of processes

Methods (same rank, steps, lr and data order for all; adapters on gate/up/down_proj):
    mode       4 text LoRA experts + 1 image LoRA, routed by modality, + KD from the frozen model
               on the generation stream (lambda 0.3, T 2)
    mode-nokd  the same without KD (ablation)
    lora       one LoRA for all tokens
    moelora    the 4-expert text-style mixture for all tokens (no modality split)
Text-only methods route every token as text: their modality spec's image range lies past the
vocabulary, so no token is an image token and the image expert stays idle (not counted in
trainable_params).

Under torchrun every process draws the same global batch of --batch-size rows and trains on its
share of the rows; gradients are averaged (DDP, or FSDP2 per decoder layer with --fsdp), so N
processes give the result of one, up to float rounding, with --dropout 0 (dropout draws differ
per process).

--probe-conflict EVERY: every EVERY steps of a task, the cosine between the task-loss and the
generation-loss gradients per adapter group (`mode.probe`), on batches of their own draw; it
changes no training result. Not with --fsdp (sharded gradients).

Resuming is exact: the batch of each step and its dropout draws are seeded by
(seed, task, step), so a run killed and resumed ends with the same metrics as one that was not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import mode
from mode import checkpoints, digits, distributed, jsonl_data, probe
from mode import digits_model as dm
from mode.jsonl_data import IGNORE_INDEX
from mode.kd import kd_positions
from mode.modality import IMAGE

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
    benchmark: str | None = "digits"  # None with `model`
    methods: tuple[str, ...] = ("mode", "lora")
    seed: int = 0
    steps_per_task: int = 60
    batch_size: int = 16  # per micro-batch, over all processes
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
    eval_size: int = 200  # test images per evaluation (tasks and image NLL); --model: records per task
    gen_samples_per_digit: int = 20
    gen_temperature: float = dm.GenerationConfig.temperature
    pretrain_steps: int = dm.PretrainConfig.steps
    checkpoint_every: int = 20
    model: str | None = None  # a local Hugging Face checkpoint instead of the benchmark
    modality: str = "chameleon"  # its image tokens (mode.checkpoints.modality_spec_for)
    data: str | None = None  # comma-separated task JSONL files
    eval_data: str | None = None  # comma-separated JSONL files scored by exact match (default: data)
    gen_data: str | None = None  # comma-separated JSONL files of the generation stream
    gen_prompts: tuple[str, ...] = ()  # prompt token files drawn after the last task
    image_tokens: int = 1024  # codes per drawn image
    on_bad_record: str = "refuse"
    fsdp: bool = False
    probe_conflict: int = 0  # probe every this many steps; 0: off


def config_dict(config: TrainConfig) -> dict:
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


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


# ----------------------------------------------------------------------------- checkpoints

def load_progress(path: Path, config: TrainConfig) -> dict:
    """The trainer state stored with the checkpoint directory `path` (no tensors)."""
    try:
        state = distributed.checkpoint_extra(path)
        if not isinstance(state, dict) or "config" not in state or "done" not in state:
            raise ValueError("not a mode.train checkpoint")
    except (OSError, ValueError) as err:
        raise corrupt_checkpoint(path, err) from err
    if state["config"] != config_dict(config):
        raise RunError(f"checkpoint {path} was written by a run with another config")
    return state


def load_adapters(path: Path, model, optimizer=None) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        distributed.load_checkpoint(path, model, optimizer)
    except (Exception, CheckpointException) as err:  # DCP raises several types for damaged shards
        raise corrupt_checkpoint(path, err) from err


def corrupt_checkpoint(path: Path, err: BaseException) -> RunError:
    return RunError(f"corrupt checkpoint {path} ({type(err).__name__}: {err}); delete it to start over")


# ----------------------------------------------------------------------------- models

def adapt(model, method: Method, config: TrainConfig, spec: mode.ModalitySpec, vocab_size: int,
          kd_vocab_range: tuple[int, int] | None = None):
    """`model` with the method's adapters (their init draws from torch's global generator)."""
    if not method.split_modality:
        spec = mode.ModalitySpec(image_token_ranges=((vocab_size, vocab_size + 1),))  # matches no token
    mode_config = mode.MoDEConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                  experts_per_modality=method.experts_per_modality, modality=spec,
                                  kd_temperature=config.kd_temperature, kd_vocab_range=kd_vocab_range)
    return mode.apply_mode(model, mode_config)


def lora_model(base_state: dict, pretrained: dm.Pretrained, method: Method, config: TrainConfig, device):
    """A fresh copy of the pretrained digits model with the method's adapters."""
    vocab = pretrained.vocab
    torch.manual_seed(config.seed)  # the adapters' init (after build_model's draws)
    model = dm.build_model(vocab, pretrained.model_config)
    model.load_state_dict(base_state)
    spec = mode.ModalitySpec(**vocab.modality_spec_args())
    return adapt(model, method, config, spec, len(vocab), vocab.image_code_range).to(device)


def wrap(model, config: TrainConfig, device: torch.device):
    """DDP, or FSDP2 with --fsdp (in one process: the model itself)."""
    if not config.fsdp:
        return distributed.wrap_ddp(model)
    # bf16 halves the base's memory and all-gathers on GPUs; CPUs compute it slower than float32
    return distributed.wrap_fsdp2(model, base_dtype=torch.bfloat16 if device.type == "cuda" else None)


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


# ----------------------------------------------------------------------------- workloads
# A workload is what a run trains and evaluates: task rows, the generation stream, a collate
# function, fresh adapted models, and the evaluations. Evaluations run on every process (FSDP2
# forwards are collectives) with the same seeds; rank 0 records them.

def eval_split(data: digits.DigitsData, config: TrainConfig) -> digits.DigitsData:
    """The data with only the first eval_size test images (evaluation runs after every task)."""
    return replace(data, test_images=data.test_images[: config.eval_size], test_labels=data.test_labels[: config.eval_size])


def generation_config(config: TrainConfig) -> dm.GenerationConfig:
    return dm.GenerationConfig(config.gen_samples_per_digit, config.gen_temperature, config.seed)


class DigitsWorkload:
    """The digits benchmark: the pretrained digits model (cached) and the continual digit tasks."""

    def __init__(self, config: TrainConfig, device: torch.device, cache_dir, progress: bool):
        def load():
            return dm.load_or_pretrain(pretrain_config=replace(dm.PretrainConfig(), steps=config.pretrain_steps),
                                       cache_dir=cache_dir, progress=progress)

        # Rank 0 pretrains (or reads the cache) first; the others then read its cache file
        # instead of pretraining too and racing on it.
        if distributed.is_main():
            self.pretrained = load()
        distributed.barrier()
        if not distributed.is_main():
            self.pretrained = load()
        self.config, self.device, self.progress = config, device, progress
        vocab, data = self.pretrained.vocab, self.pretrained.data
        self.base_state = {k: v.clone() for k, v in self.pretrained.model.state_dict().items()}
        self.name = config.benchmark
        self.task_names = [task.name for task in digits.CONTINUAL_TASKS]
        self.spec = mode.ModalitySpec(**vocab.modality_spec_args())
        self.generation_rows = digits.generation_examples(vocab, data.train_images, data.train_labels)
        self.classifier = dm.fit_digit_classifier(data)
        self.test = eval_split(data, config)

    def task_rows(self, index: int) -> list:
        data = self.pretrained.data
        return digits.task_examples(self.pretrained.vocab, digits.CONTINUAL_TASKS[index], data.train_images,
                                    data.train_labels)

    def collate(self, rows) -> dict:
        return digits.collate(rows, self.pretrained.vocab.pad)

    def build(self, method: Method):
        return lora_model(self.base_state, self.pretrained, method, self.config, self.device)

    def _accuracy(self, model, task: digits.Task) -> float:
        return dm.task_accuracy(model, self.pretrained.vocab, task, self.test.test_images, self.test.test_labels,
                                progress=self.progress)

    def _generation(self, model) -> dict:
        return dm.evaluate_generation(model, self.pretrained.vocab, self.test, self.classifier,
                                      generation_config(self.config), self.progress)

    def evaluate(self, model) -> dict:
        """Accuracy on every continual task and generation quality, on the first eval_size test images."""
        return {"accs": [self._accuracy(model, task) for task in digits.CONTINUAL_TASKS], **self._generation(model)}

    def evaluate_pretrained(self, model) -> dict:
        return {**self._generation(model), "digit_acc": self._accuracy(model, digits.DIGIT),
                "classifier_acc": self.classifier.test_accuracy}

    @staticmethod
    def summary(pretrained: dict) -> str:
        return (f"Pretrained model: gen_acc {pretrained['gen_acc']:.3f}, image NLL {pretrained['image_nll']:.4f} "
                f"nats/code; understanding (digit) acc {pretrained['digit_acc']:.3f}; judge classifier test acc "
                f"{pretrained['classifier_acc']:.3f}.")

    def finish(self, model, name: str, output: Path) -> dict:
        # one "draw a d" per digit after the last task, for the plot
        samples = dm.sample_images(model, self.pretrained.vocab, np.arange(10), self.config.gen_temperature,
                                   self.config.seed)
        return {"samples": samples.tolist()}


class CheckpointWorkload:
    """A local Hugging Face checkpoint (--model) and pre-tokenized JSONL tasks (--data)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device, self.name = config, device, config.model
        try:
            # kept for the first method, which would otherwise load the checkpoint again
            self._unused_base = self._load()
            vocab = self.vocab_size = checkpoints.vocab_size(self._unused_base)
            self.spec = checkpoints.modality_spec_for(config.modality, vocab)
            max_length = getattr(self._unused_base.config, "max_position_embeddings", None)

            def read(files: str) -> jsonl_data.JsonlDataset:
                return jsonl_data.load_jsonl(files.split(","), vocab, on_error=config.on_bad_record,
                                             max_length=max_length)

            with warnings.catch_warnings():
                if not distributed.is_main():
                    warnings.simplefilter("ignore")  # the skipped-records report once, from rank 0
                tasks = read(config.data)
                evals = read(config.eval_data) if config.eval_data else tasks
                self.generation_rows = read(config.gen_data).records if config.gen_data else None
            for path in config.gen_prompts:
                checkpoints.load_prompt(path, vocab)  # bad prompt files fail now, not after training
        except (OSError, ValueError) as err:
            raise RunError(str(err)) from err
        self.pad_id = getattr(self._unused_base.config, "pad_token_id", None) or 0
        self.task_names = tasks.task_names()
        self.tasks = [tasks.task(name).records for name in self.task_names]
        # the first eval_size held-out records of each training task
        held_out = {name: [i for i, task in enumerate(evals.tasks) if task == name][: config.eval_size]
                    for name in self.task_names}
        missing = [name for name, rows in held_out.items() if not rows]
        if missing:
            raise RunError(f"--eval-data has no record of the task(s) {missing} (its tasks: {evals.task_names()}); "
                           "a record's task is its \"task\" field, else its file's name: name held-out files "
                           "like the task files (test/gqa.jsonl for gqa.jsonl)")
        keep = [i for rows in held_out.values() for i in rows]
        self.evals = jsonl_data.JsonlDataset([evals.records[i] for i in keep], [evals.tasks[i] for i in keep],
                                             [evals.sources[i] for i in keep])

    def _load(self):
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        return checkpoints.load_model(self.config.model, dtype=dtype, device=self.device)

    def task_rows(self, index: int) -> list:
        return self.tasks[index]

    def collate(self, rows) -> dict:
        return jsonl_data.collate(rows, self.pad_id)

    def build(self, method: Method):
        model, self._unused_base = self._unused_base or self._load(), None
        torch.manual_seed(self.config.seed)  # the adapters' init
        return adapt(model, method, self.config, self.spec, self.vocab_size)

    @torch.no_grad()
    def image_nll(self, model) -> float | None:
        """Mean NLL per scored image token of the first eval_size generation-stream records."""
        if self.generation_rows is None:
            return None
        rows = self.generation_rows[: self.config.eval_size]
        total, count = 0.0, 0
        for start in range(0, len(rows), self.config.batch_size):
            batch = to_device(self.collate(rows[start:start + self.config.batch_size]), self.device)
            n = int(((self.spec.modality_ids(batch["input_ids"]) == IMAGE) & probe.scored(batch))[:, 1:].sum())
            if n:
                total += probe.generation_loss(model, batch, self.spec).item() * n
                count += n
        if not count:
            raise RunError(f"--gen-data: its first {len(rows)} records score no image token of --modality "
                           f"{self.config.modality}")
        return total / count

    def evaluate(self, model) -> dict:
        """Exact match per task on the held-out records, and image_nll (gen_acc is digits' only)."""
        accs = checkpoints.exact_match_accuracy(model, self.evals, batch_size=self.config.batch_size)
        return {"accs": [accs[name] for name in self.task_names], "gen_acc": None, "image_nll": self.image_nll(model)}

    def evaluate_pretrained(self, model) -> dict:
        return {"gen_acc": None, "image_nll": self.image_nll(model)}

    @staticmethod
    def summary(pretrained: dict) -> str:
        nll = pretrained["image_nll"]
        return "Pretrained model: " + ("no --gen-data." if nll is None else f"image NLL {nll:.4f} nats/code.")

    def finish(self, model, name: str, output: Path) -> dict:
        if not self.config.gen_prompts:
            return {}
        with tempfile.TemporaryDirectory() as scratch:
            # every process draws (FSDP2 forwards are collectives); rank 0 keeps the files
            out_dir = output / "images" / name if distributed.is_main() else Path(scratch)
            images = checkpoints.generate_images(model, self.config.gen_prompts, out_dir, self.spec,
                                                 image_tokens=self.config.image_tokens,
                                                 temperature=self.config.gen_temperature, seed=self.config.seed,
                                                 batch_size=self.config.batch_size)
        return {"images": images}


# ----------------------------------------------------------------------------- training

def step_seed(config: TrainConfig, task_index: int, step: int) -> list[int]:
    return [config.seed, task_index, step]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def draw_batch(rng: np.random.Generator, rows: list, collate, config: TrainConfig, device) -> dict:
    """This process's share of a global batch of batch_size rows drawn by `rng` (the same draw
    on every process)."""
    picked = rng.integers(len(rows), size=config.batch_size)
    return to_device(distributed.shard_batch(collate([rows[i] for i in picked])), device)


def train_step(model, optimizer, task_rows, generation_rows, collate, method: Method, config: TrainConfig,
               task_index: int, step: int, device) -> float:
    """One optimizer step (grad_accum micro-batches); data and dropout seeded by (seed, task, step)."""
    rng = np.random.default_rng(step_seed(config, task_index, step))
    torch.manual_seed(int(rng.integers(2**62)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(config.grad_accum):
        last = micro + 1 == config.grad_accum
        # DDP: all-reduce the gradients once, in the last micro-batch's backward
        no_sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with no_sync:
            batch = draw_batch(rng, task_rows, collate, config, device)
            # right padding under a causal mask: no attention mask needed (pads carry no loss)
            with autocast:
                out = model(input_ids=batch["input_ids"], labels=batch["labels"])
                # HF's loss is the mean over this process's targets; global_mean turns it into this
                # process's part of the global batch's mean, which DDP's gradient average then gives
                targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                loss = distributed.global_mean(out.loss * targets, targets)
                if method.kd:
                    kd_batch = draw_batch(rng, generation_rows, collate, config, device)
                    # the teacher pass needs the Hugging Face model, not the DDP wrapper
                    kd_sum = mode.kd_loss(distributed.unwrap(model), kd_batch, reduction="sum")
                    loss = loss + config.kd_lambda * distributed.global_mean(kd_sum, kd_positions(kd_batch).sum())
            (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    return total


def probe_step(model, workload, method: Method, config: TrainConfig, task_rows, task_index: int, step: int,
               device) -> dict:
    """The gradient-conflict cosines of this step, on batches from a stream of their own (the
    training draws stay as they are)."""
    rng = np.random.default_rng(step_seed(config, task_index, step) + [1])
    task_batch = draw_batch(rng, task_rows, workload.collate, config, device)
    generation_batch = draw_batch(rng, workload.generation_rows, workload.collate, config, device)
    # The real image spec: a text-only method's own spec matches no token.
    cosines = probe.conflict_cosines(model, task_batch, generation_batch, spec=workload.spec,
                                     shared=not method.split_modality)
    return {"step": task_index * config.steps_per_task + step, "task": workload.task_names[task_index], **cosines}


def run_method(name: str, workload, config: TrainConfig, device, output: Path, state: dict, progress: bool) -> None:
    """Train the tasks of one method in order, continuing from `state["current"]` if it is this method."""
    method = METHODS[name]
    checkpoint_path = output / "checkpoint"
    model = wrap(workload.build(method), config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if state["pretrained"] is None:
        # Fresh adapters (lora_B = 0) leave the model's function as it is: this is the pretrained
        # model, as this run computes it (with --fsdp on GPUs its base in bf16).
        state["pretrained"] = workload.evaluate_pretrained(distributed.unwrap(model))
    current = state["current"]
    if current is not None and current["method"] == name:
        if current["step"] == 0:
            load_adapters(checkpoint_path, model)  # saved at a task boundary: adapters only
    else:
        current = {"method": name, "task": 0, "step": 0, "results": [], "train_seconds": 0.0}
    for task_index, task_name in enumerate(workload.task_names):
        if task_index < current["task"]:
            continue
        rows = workload.task_rows(task_index)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        if current["step"]:
            load_adapters(checkpoint_path, model, optimizer)  # saved mid-task: adapters and this task's optimizer
        warmup = max(1, int(config.warmup_fraction * config.steps_per_task))
        model.train()
        bar = tqdm(range(current["step"], config.steps_per_task), desc=f"{name} {task_name}", disable=not progress,
                   initial=current["step"], total=config.steps_per_task)
        for step in bar:
            if config.probe_conflict and step % config.probe_conflict == 0:
                current.setdefault("conflict", []).append(
                    probe_step(model, workload, method, config, rows, task_index, step, device))
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = dm.cosine_lr(step, config.steps_per_task, warmup, config.lr)
            loss = train_step(model, optimizer, rows, workload.generation_rows, workload.collate, method, config,
                              task_index, step, device)
            current["train_seconds"] += time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.3f}")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps_per_task:
                current["step"] = step + 1
                distributed.save_checkpoint(checkpoint_path, model, optimizer, extra=state | {"current": current})
        current["results"].append(workload.evaluate(distributed.unwrap(model)))
        current.update(task=task_index + 1, step=0)
        distributed.save_checkpoint(checkpoint_path, model, extra=state | {"current": current})
    results = current["results"]
    acc_matrix = [r["accs"] for r in results]
    state["done"][name] = {
        "acc_matrix": acc_matrix,
        "avg_acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "gen_acc": [r["gen_acc"] for r in results],
        "gen_retention": retention(results[-1]["gen_acc"], state["pretrained"]["gen_acc"]),
        "image_nll": [r["image_nll"] for r in results],
        "train_seconds": current["train_seconds"],
        "trainable_params": trainable_params(model, method),
        **({"conflict": current["conflict"]} if "conflict" in current else {}),
        **workload.finish(distributed.unwrap(model), name, output),
    }
    state["current"] = None
    distributed.save_checkpoint(checkpoint_path, model, extra=state)


def retention(gen_acc: float | None, pretrained_gen_acc: float | None) -> float | None:
    """gen_acc after the last task relative to the pretrained model's (None without gen_acc)."""
    if gen_acc is None:
        return None
    return gen_acc / pretrained_gen_acc if pretrained_gen_acc else 0.0


# ----------------------------------------------------------------------------- reports

def metrics_json(state: dict, workload) -> dict:
    return {
        "benchmark": workload.name,
        "tasks": workload.task_names,
        "pretrained": {k: state["pretrained"][k] for k in ("gen_acc", "image_nll")},
        "methods": {name: {k: v for k, v in m.items() if k != "samples"} for name, m in state["done"].items()},
    }


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
    names = [name for name, m in state["done"].items() if "samples" in m]
    if names:
        fig, axes = plt.subplots(len(names), 10, figsize=(10, 1.2 * len(names)), squeeze=False)
        for row, name in enumerate(names):
            for digit in range(10):
                ax = axes[row][digit]
                ax.imshow(np.array(state["done"][name]["samples"][digit]), cmap="gray_r", vmin=0, vmax=16)
                ax.set_xticks([])
                ax.set_yticks([])
                if digit == 0:
                    ax.set_ylabel(name)
        fig.suptitle("draw a 0..9, after the last task")
        fig.tight_layout()
        fig.savefig(output / "generated_digits.png")
        plt.close(fig)
    conflict = {name: m["conflict"] for name, m in metrics["methods"].items() if "conflict" in m}
    if conflict:
        probe.plot_conflict(conflict, output / "conflict.png")


# ----------------------------------------------------------------------------- main

def check_config(config: TrainConfig) -> None:
    """Refuse inconsistent settings before anything is written."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise RunError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if config.model is not None:
        if config.benchmark is not None:
            raise RunError("--model and --benchmark exclude each other: a --model run trains on --data")
        if not config.data:
            raise RunError("--model needs --data (the task JSONL files)")
        kd = [m for m in config.methods if METHODS[m].kd]
        if kd and not config.gen_data:
            raise RunError(f"method(s) {kd} distil on the generation stream: give --gen-data")
        if config.probe_conflict and not config.gen_data:
            raise RunError("--probe-conflict needs --gen-data (the generation loss)")
    else:
        if config.benchmark not in BENCHMARKS:
            raise RunError(f"unknown benchmark {config.benchmark!r}; choose from {', '.join(BENCHMARKS)}")
        given = [flag for flag, value in (("--data", config.data), ("--eval-data", config.eval_data),
                                          ("--gen-data", config.gen_data), ("--gen-prompts", config.gen_prompts))
                 if value]
        if given:
            raise RunError(f"{', '.join(given)} need(s) --model (the digits benchmark brings its own data)")
    if config.fsdp and config.probe_conflict:
        raise RunError("--fsdp and --probe-conflict exclude each other: the probe needs unsharded gradients")
    if config.probe_conflict < 0:
        raise RunError(f"--probe-conflict {config.probe_conflict}: expected a number of steps >= 0")
    if config.batch_size < distributed.world_size():
        raise RunError(f"--batch-size {config.batch_size} is smaller than the {distributed.world_size()} processes: "
                       "every process needs a row of the global batch")


def run(config: TrainConfig, output: Path, resume: bool = False, device: str = "cpu", cache_dir=None,
        progress: bool = True) -> dict:
    """Run every method of `config`, write the results to `output` (rank 0), and return metrics.json's content.

    Under torchrun every process calls it; it joins the process group (`mode.distributed.init`).
    """
    distributed.init()
    check_config(config)
    if distributed.is_distributed():
        device = distributed.device()  # this process's GPU, or the CPU under gloo
    device = torch.device(device)
    progress = progress and distributed.is_main()
    output.mkdir(parents=True, exist_ok=True)
    config_path, checkpoint_path = output / "config.json", output / "checkpoint"
    config_json = json.dumps(asdict(config), indent=2, sort_keys=True)
    # every process checks (read-only, same answer), so all refuse together
    if config_path.exists() and json.loads(config_path.read_text()) != json.loads(config_json):
        raise RunError(f"{output} holds another run (its config.json differs); choose another --output")
    state = load_progress(checkpoint_path, config) if resume and checkpoint_path.exists() else None
    workload = (CheckpointWorkload(config, device) if config.model is not None
                else DigitsWorkload(config, device, cache_dir, progress))
    distributed.atomic_write_text(config_path, config_json)
    if state is None:
        state = {"config": config_dict(config), "pretrained": None, "done": {}, "current": None}
    for name in config.methods:
        if name not in state["done"]:
            run_method(name, workload, config, device, output, state, progress)

    metrics = metrics_json(state, workload)
    distributed.atomic_write_json(output / "metrics.json", metrics)
    distributed.atomic_write_text(output / "results.md", results_markdown(metrics, workload.summary(state["pretrained"])))
    if distributed.is_main():
        write_plots(output, state, metrics)
    return metrics


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="mode-train", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", default=None, help=f"one of: {', '.join(BENCHMARKS)} (default {defaults.benchmark}, "
                                                      "unless --model)")
    p.add_argument("--methods", default=",".join(defaults.methods), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--output", required=True, type=Path, help="directory for metrics, tables, plots, checkpoint")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps-per-task", type=int, default=defaults.steps_per_task)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (over all processes)")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--dropout", type=float, default=defaults.dropout,
                   help="adapter dropout (0 for results equal to one process under torchrun)")
    p.add_argument("--eval-size", type=int, default=defaults.eval_size,
                   help="test images per evaluation; --model: eval records per task and generation records")
    p.add_argument("--gen-samples", type=int, default=defaults.gen_samples_per_digit, help="sampled images per digit")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--model", help="local Hugging Face checkpoint directory (instead of --benchmark digits)")
    p.add_argument("--modality", default=defaults.modality,
                   help="image tokens of --model: chameleon|anole|'LO:HI,begin=ID,end=ID'")
    p.add_argument("--data", help="comma-separated task JSONL files (tasks in file order, then first-record order)")
    p.add_argument("--eval-data", help="comma-separated held-out JSONL files scored by exact match, tasks matched "
                                       "by name: test/gqa.jsonl for gqa.jsonl (default: --data)")
    p.add_argument("--gen-data", help="comma-separated JSONL generation stream for KD (caption + image codes, "
                                      "image part scored)")
    p.add_argument("--gen-prompts", nargs="*", default=[], help="prompt token files (.json/.pt) drawn after the last task")
    p.add_argument("--image-tokens", type=int, default=defaults.image_tokens, help="codes per image of --gen-prompts")
    p.add_argument("--on-bad-record", choices=("skip", "refuse"), default=defaults.on_bad_record,
                   help="bad JSONL records (listed with file:line): stop before training, or drop them")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 per decoder layer; frozen base in bf16 on GPUs, adapters in fp32")
    p.add_argument("--probe-conflict", type=int, default=defaults.probe_conflict, metavar="EVERY",
                   help="gradient-conflict probe every EVERY steps (0: off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="without torchrun (under torchrun: each process's GPU, else the CPU)")
    p.add_argument("--cache-dir", default=None, help="pretrained-model cache (default $MODE_CACHE_DIR or ~/.cache/mode-kernels)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    benchmark = args.benchmark if args.model is not None else args.benchmark or defaults.benchmark
    config = replace(defaults, benchmark=benchmark, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                     seed=args.seed, steps_per_task=args.steps_per_task, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, lr=args.lr, dropout=args.dropout, eval_size=args.eval_size,
                     gen_samples_per_digit=args.gen_samples, pretrain_steps=args.pretrain_steps,
                     checkpoint_every=args.checkpoint_every, model=args.model, modality=args.modality,
                     data=args.data, eval_data=args.eval_data, gen_data=args.gen_data,
                     gen_prompts=tuple(args.gen_prompts), image_tokens=args.image_tokens,
                     on_bad_record=args.on_bad_record, fsdp=args.fsdp, probe_conflict=args.probe_conflict)
    return config, args


def main(argv=None) -> int:
    config, args = parse_args(argv)
    try:
        metrics = run(config, args.output, resume=args.resume, device=args.device, cache_dir=args.cache_dir,
                      progress=not args.no_progress)
        if distributed.is_main():
            print((args.output / "results.md").read_text())
    except RunError as err:
        print(f"mode-train: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0 if metrics else 1


if __name__ == "__main__":
    sys.exit(main())
