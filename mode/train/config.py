"""The trainer's one config: every field is a command-line flag (``mode.train.cli``) with the help
text given here, and the run's ``config.json``. ``TrainConfig`` is the trainer's own fields
(``TrainerOptions``) and every workload's options (``mode.workloads.WorkloadFactory.options``)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass

from ..workloads.protocol import RunSettings, WorkloadError, WorkloadFactory, field_metadata
from ..workloads.registry import benchmarks, local_model
from .distributed import world_size
from .methods import METHODS


class RunError(Exception):
    """Bad input: reported as a clear message, nothing overwritten."""


@contextlib.contextmanager
def workload_errors_as_run_errors():
    """A workload's bad-input error (``WorkloadError``) becomes the trainer's ``RunError``, message unchanged."""
    try:
        yield
    except WorkloadError as err:
        raise RunError(str(err)) from err


@dataclass
class TrainerOptions:
    """The trainer's own fields of ``TrainConfig``."""
    benchmark: str | None = field(default="digits", metadata=field_metadata(
        f"workload by name (mode.workloads.registry), one of: {', '.join(benchmarks())} (default: digits, unless "
        "--model)"))
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
        "peak learning rate (AdamW, cosine schedule, warmup_fraction of each task's steps); default: the workload's "
        f"({', '.join(f'{name}: {factory.default_lr}' for name, factory in benchmarks().items())}; "
        f"--model: {local_model().default_lr}, the paper's)"))
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
        "distil only the teacher's k most likely image codes, both distributions renormalised on them; 0 (or a k "
        "past the slice's size): the whole image-code slice; default: 256 with --model (the official MoDE "
        "code's), else the whole slice"))
    kd_topk_tail: bool = field(default=False, metadata=field_metadata(
        "with --kd-topk: the teacher's mass outside its top k as one more outcome of both distributions "
        "(mode.kd_loss's topk_tail; the student's path is then dense over the slice)"))
    kd_cache: bool = field(default=True, metadata=field_metadata(
        "compute the teacher's top k over the generation stream once per run and store it under "
        "--cache-dir/kd-teacher (keyed by the model, its dtype, the data, k, the temperature and the slice), "
        "reused by every task, method and seed; --no-kd-cache: the teacher's forward on every KD batch "
        "(the same results; not with --fsdp, whose teacher is always computed)"))
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
    gen_temperature: float = field(default=1.0, metadata=field_metadata(
        "sampling temperature of generated images"))
    checkpoint_every: int = field(default=20, metadata=field_metadata("steps between mid-task checkpoints"))
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
        if self.lr is None and self.workload is not None:
            self.lr = self.workload.default_lr
        if self.kd_topk is None and self.model is not None:
            self.kd_topk = 256  # the official MoDE code's

    @property
    def workload(self) -> WorkloadFactory | None:
        """The run's workload: the local model's with --model (that workload's option), else --benchmark's
        (None if unknown)."""
        return local_model() if self.model is not None else benchmarks().get(self.benchmark)

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds each method runs with: --seeds, else --seed."""
        return tuple(self.seeds) or (self.seed,)

    def settings(self, seed: int) -> RunSettings:
        """What the workload reads of this config, with ``seed``."""
        return RunSettings(seed=seed, batch_size=self.batch_size, eval_size=self.eval_size,
                           gen_temperature=self.gen_temperature)


def workload_fields() -> list[tuple[str, str, Field]]:
    """Every workload's options as fields of ``TrainConfig`` (make_dataclass's form); a name belongs to one
    option only, so that config.json stays flat."""
    taken, composed = {f.name for f in fields(TrainerOptions)}, []
    for factory in (*benchmarks().values(), local_model()):
        for option in fields(factory.options):
            if option.name in taken:
                raise TypeError(f"{factory.options.__name__}.{option.name}: the name is taken by another option "
                                "of the trainer or a workload")
            taken.add(option.name)
            composed.append((option.name, option.type, field(default=option.default,
                                                            default_factory=option.default_factory,
                                                            metadata=option.metadata)))
    return composed


TrainConfig = make_dataclass("TrainConfig", workload_fields(), bases=(TrainerOptions,))
TrainConfig.__module__ = __name__  # (make_dataclass's module= needs Python 3.12) for pickle and repr
TrainConfig.__doc__ = "Everything that determines the results of a run (stored in DIR/config.json)."


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
        if config.benchmark not in benchmarks():
            raise RunError(f"unknown benchmark {config.benchmark!r}; choose from {', '.join(benchmarks())}")
        given = [flag for flag, value in (("--data", config.data), ("--eval-data", config.eval_data),
                                          ("--gen-data", config.gen_data), ("--gen-prompts", config.gen_prompts))
                 if value]
        if given:
            raise RunError(f"{', '.join(given)} need(s) --model (a benchmark brings its own data)")
    for name in ("steps_per_task", "batch_size", "grad_accum", "eval_size", "rank", "checkpoint_every",
                 "image_tokens", "gen_samples", "replay_size", "ewc_samples"):
        if getattr(config, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} {getattr(config, name)}: expected an integer >= 1")
    if config.kd_topk is not None and config.kd_topk < 0:
        raise RunError(f"--kd-topk {config.kd_topk}: expected an integer >= 1 (or 0: the whole slice)")
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
