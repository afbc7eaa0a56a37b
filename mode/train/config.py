"""The trainer's one config: every field is a command-line flag (``mode.train.cli``) with the help
text given here, and the run's ``config.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..workloads.digits.data import PRETRAIN_QUESTIONS, TASK_DESIGNS
from ..workloads.digits.model import GenerationConfig, PretrainConfig
from .distributed import world_size
from .methods import METHODS

BENCHMARKS = ("digits",)
DIGITS_LR = 3e-3  # the digits benchmark's tiny model learns each task in 60 steps at this rate
PAPER_LR = 1e-4  # the paper's optimizer for Anole-7B: AdamW, cosine, 10% warmup


class RunError(Exception):
    """Bad input: reported as a clear message, nothing overwritten."""


def field_metadata(text: str, **argparse_options) -> dict:
    """A field's ``metadata``: its help text and any argparse options beyond type and default."""
    return {"help": text, **argparse_options}


@dataclass
class TrainConfig:
    """Everything that determines the results of a run (stored in DIR/config.json)."""
    benchmark: str | None = field(default="digits", metadata=field_metadata(
        f"built-in benchmark, one of: {', '.join(BENCHMARKS)} (default: digits, unless --model)"))
    methods: tuple[str, ...] = field(default=("mode", "lora"), metadata=field_metadata(
        f"comma-separated, of: {', '.join(METHODS)}"))
    seed: int = field(default=0, metadata=field_metadata("adapter init, data order, dropout and sampling"))
    seeds: tuple[int, ...] = field(default=(), metadata=field_metadata(
        "comma-separated seeds (instead of --seed): every method runs once per seed on the same pretrained "
        "model; metrics.json keeps each seed's results and their mean and standard error"))
    steps_per_task: int = field(default=60, metadata=field_metadata("optimizer steps per task"))
    batch_size: int = field(default=16, metadata=field_metadata("rows per micro-batch, over all processes"))
    grad_accum: int = field(default=1, metadata=field_metadata("micro-batches per optimizer step"))
    lr: float | None = field(default=None, metadata=field_metadata(
        "peak learning rate (AdamW, cosine schedule, warmup_fraction of each task's steps); default: "
        f"{DIGITS_LR} on digits, {PAPER_LR} with --model (the paper's)"))
    warmup_fraction: float = field(default=0.1, metadata=field_metadata("share of each task's steps warming up"))
    weight_decay: float = field(default=0.0, metadata=field_metadata("AdamW weight decay on the adapters"))
    grad_clip: float = field(default=10.0, metadata=field_metadata("gradient-norm clip"))
    rank: int = field(default=8, metadata=field_metadata("LoRA rank of every expert"))
    alpha: float = field(default=16.0, metadata=field_metadata("LoRA alpha (scaling alpha / rank)"))
    dropout: float = field(default=0.05, metadata=field_metadata(
        "adapter dropout (0 for results equal to one process under torchrun)"))
    kd_lambda: float = field(default=0.3, metadata=field_metadata("weight of the KD term (methods with KD)"))
    kd_temperature: float = field(default=2.0, metadata=field_metadata("KD softmax temperature"))
    kd_topk: int | None = field(default=None, metadata=field_metadata(
        "distil only the teacher's k most likely image codes, both distributions renormalised on them (the "
        "official MoDE code: 256); default: the whole image-code slice"))
    kd_routing: str = field(default="tokens", metadata=field_metadata(
        "MoDE's generation stream under KD: 'tokens' routes each token by its id (the caption to the text "
        "experts, the image to the image expert); 'image' sends the whole stream to the image expert, as the "
        "official code does (an ablation; methods without a modality split route everything alike)",
        choices=("tokens", "image")))
    replay_size: int = field(default=100, metadata=field_metadata("replay: buffered rows of each earlier task"))
    replay_share: float = field(default=0.3, metadata=field_metadata(
        "replay: share of each batch's rows drawn from the buffer (after the first task)"))
    ewc_lambda: float = field(default=100.0, metadata=field_metadata("ewc: weight of the Fisher penalty"))
    ewc_samples: int = field(default=100, metadata=field_metadata(
        "ewc: training rows of a finished task whose gradients estimate its Fisher diagonal"))
    eval_size: int = field(default=200, metadata=field_metadata(
        "test images per evaluation (tasks and image NLL); --model: eval records per task and generation records"))
    gen_samples: int = field(default=GenerationConfig.samples_per_digit, metadata=field_metadata(
        "digits: sampled images per digit for gen_acc"))
    gen_temperature: float = field(default=GenerationConfig.temperature, metadata=field_metadata(
        "sampling temperature of generated images"))
    pretrain_steps: int = field(default=PretrainConfig.steps, metadata=field_metadata(
        "digits: pretraining steps of the cached model"))
    pretrain_seed: int = field(default=PretrainConfig.seed, metadata=field_metadata(
        "digits: seed of the cached model's pretraining"))
    pretrain_questions: str = field(default=PretrainConfig.questions, metadata=field_metadata(
        "digits: the pretraining's questions about the image: 'one' (what digit is this ?) or 'several' (also "
        "'is this digit prime ?' and 'what is this digit squared ?', each answered in its own format)",
        choices=tuple(PRETRAIN_QUESTIONS)))
    digits_tasks: str = field(default="shared", metadata=field_metadata(
        "digits: the continual tasks' images: the same upright images for every task ('shared'), or each task "
        "its own view of them ('domains': upright, inverted, transposed, thickened; 'marked': upright with a bar "
        "on the top, left, bottom, right border)", choices=tuple(TASK_DESIGNS)))
    checkpoint_every: int = field(default=20, metadata=field_metadata("steps between mid-task checkpoints"))
    model: str | None = field(default=None, metadata=field_metadata(
        "local Hugging Face checkpoint directory (instead of --benchmark digits)"))
    modality: str = field(default="chameleon", metadata=field_metadata(
        "image tokens of --model: chameleon|anole|emu3 (from its vocabulary; Emu3's generation layout)|"
        "'LO:HI,begin=ID,end=ID'"))
    data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated task JSONL files (tasks in file order, then first-record order)"))
    eval_data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated held-out JSONL files scored by exact match, tasks matched by name: test/gqa.jsonl for "
        "gqa.jsonl (default: --data)"))
    gen_data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated JSONL generation stream for KD (caption + image codes, image part scored)"))
    gen_prompts: tuple[str, ...] = field(default=(), metadata=field_metadata(
        "prompt token files (.json/.pt) drawn after the last task", nargs="*"))
    image_tokens: int = field(default=1024, metadata=field_metadata(
        "codes per image of --gen-prompts (emu3: each prompt file's height and width)"))
    decoder: str | None = field(default=None, metadata=field_metadata(
        "module:function mapping an image's generated ids (LongTensor) to pixels (float [3, H, W] in [0, 1]) "
        "for --gen-prompts PNGs (Chameleon/Anole: transformers has no VQ decoder; emu3: the checkpoint's by default)",
        metavar="MODULE:FUNCTION"))
    on_bad_record: str = field(default="refuse", metadata=field_metadata(
        "bad JSONL records (listed with file:line): stop before training, or drop them", choices=("refuse", "skip")))
    fsdp: bool = field(default=False, metadata=field_metadata(
        "FSDP2 per decoder layer; frozen base in bf16 on GPUs, adapters in fp32"))
    probe_conflict: int = field(default=0, metadata=field_metadata(
        "gradient-conflict probe every this many steps (0: off)", metavar="EVERY"))
    gradient_checkpointing: bool = field(default=False, metadata=field_metadata(
        "recompute each decoder layer in the backward (Hugging Face gradient checkpointing): less activation "
        "memory, same gradients"))
    adapters_in_base_dtype: bool = field(default=False, metadata=field_metadata(
        "keep the adapters in the base model's dtype (default: float32 adapters on a bf16/fp16 base, as PEFT)"))
    report_to: str = field(default="none", metadata=field_metadata(
        "also log each step's losses and each evaluation to DIR/tensorboard", choices=("none", "tensorboard")))

    def __post_init__(self):
        if self.lr is None:
            self.lr = PAPER_LR if self.model is not None else DIGITS_LR

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds each method runs with: --seeds, else --seed."""
        return tuple(self.seeds) or (self.seed,)


def config_dict(config: TrainConfig) -> dict:
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


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
    for name in ("steps_per_task", "batch_size", "grad_accum", "eval_size", "rank", "checkpoint_every",
                 "image_tokens", "gen_samples", "replay_size", "ewc_samples"):
        if getattr(config, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} {getattr(config, name)}: expected an integer >= 1")
    if config.kd_topk is not None and config.kd_topk < 1:
        raise RunError(f"--kd-topk {config.kd_topk}: expected an integer >= 1")
    if config.seeds and config.seed != TrainConfig.seed:
        raise RunError(f"--seed {config.seed} and --seeds {','.join(map(str, config.seeds))}: give one (--seeds runs "
                       "every method once per seed in the list)")
    if len(set(config.run_seeds)) != len(config.run_seeds):
        raise RunError(f"--seeds {','.join(map(str, config.seeds))}: each seed once")
    if not 0.0 <= config.replay_share < 1.0:
        raise RunError(f"--replay-share {config.replay_share}: expected a share in [0, 1)")
    if config.ewc_lambda < 0:
        raise RunError(f"--ewc-lambda {config.ewc_lambda}: expected a weight >= 0")
    ewc = [m for m in config.methods if m in METHODS and METHODS[m].ewc]
    if config.fsdp and ewc:
        raise RunError(f"--fsdp and {ewc} exclude each other: the EWC penalty needs unsharded adapters")
    if config.fsdp and config.probe_conflict:
        raise RunError("--fsdp and --probe-conflict exclude each other: the probe needs unsharded gradients")
    if config.probe_conflict < 0:
        raise RunError(f"--probe-conflict {config.probe_conflict}: expected a number of steps >= 0")
    if config.batch_size < world_size():
        raise RunError(f"--batch-size {config.batch_size} is smaller than the {world_size()} processes: "
                       "every process needs a row of the global batch")
