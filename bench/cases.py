"""The benchmark cases: which op, at which shape, by which implementation.

A case's ``build`` allocates its inputs and returns the closure to time, so only one case's tensors
live at a time. Cases of one (op, shape) form a group; every row is compared with the group's
baselines measured in the same run.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mode_kernels as mk
from bench import baselines
from bench.model import (
    EXPERTS_PER_MODALITY,
    KD_TEMPERATURE,
    KD_TOPK,
    LORA_SCALING,
    ModelShape,
    image_span_modality,
    training_step,
)
from bench.roofline import routed_lora_flop_floor

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


class CaseSkipped(Exception):
    """The implementation cannot run here (missing package, unsupported GPU); the reason is recorded."""


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    impl: str
    build: Callable[[], Callable[[], object]]
    is_baseline: bool = False
    tokens: int | None = None   # tokens per call, for tokens/s
    flop_floor: float | None = None   # routed LoRA fwd+bwd: bench.roofline.routed_lora_flop_floor at this shape


@dataclass(frozen=True)
class Sizes:
    """Shapes of one benchmark profile."""
    linear_shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    image_shares: tuple[float, ...]
    image_span: int
    ranks: tuple[int, ...]
    directions: tuple[str, ...]
    kd_vocabs: tuple[int, ...]
    kd_positions: tuple[int, ...]
    kd_hidden: int
    model: ModelShape
    dtype: torch.dtype
    scaled_down: bool
    description: str = ""
    decode_tokens: tuple[int, ...] = (1, 16, 64)   # routed LoRA decode steps (forward, no autograd)
    # Further routed-LoRA shapes, fwd+bwd at rank ranks[0]: (K, N, tokens, image share, image span).
    extra_lora_shapes: tuple[tuple[int, int, int, float, int], ...] = ()


def _anole_model(layers: int) -> ModelShape:
    return ModelShape(hidden=4096, mlp=11008, vocab=65536, layers=layers, heads=32, batch=2, seq=2048,
                      image_span=1024)


def _cpu_model(layers: int, seq: int) -> ModelShape:
    return ModelShape(hidden=256, mlp=688, vocab=8192, layers=layers, heads=4, batch=2, seq=seq, image_span=64)


# Anole-7B shapes on CUDA; on CPU K, N, H and tokens scaled down 16x or more (vocab 8x, spans 1024 -> 64).
_CPU_SHAPES = "CPU: shapes scaled down from Anole-7B (K, N, H, tokens / 16 or more; V / 8; image spans 64), float32"
# A larger CPU routed-LoRA shape: Anole's MLP / 8, one 512-token image span in 2048 tokens.
_CPU_EXTRA_LORA = ((512, 1376, 2048, 0.25, 512),)
PROFILES = {
    ("cuda", False): Sizes(((4096, 11008), (11008, 4096)), (2048, 8192, 16384), (0.0, 0.3, 1.0), 1024, (8, 16),
                           DIRECTIONS, (8194, 65536), (4096, 16384), 4096, _anole_model(4), torch.bfloat16, False,
                           "Anole-7B shapes, bfloat16"),
    ("cuda", True): Sizes(((4096, 11008), (11008, 4096)), (8192,), (0.3,), 1024, (8,), DIRECTIONS,
                          (8194, 65536), (16384,), 4096, _anole_model(2), torch.bfloat16, False,
                          "Anole-7B shapes, bfloat16 (quick subset)"),
    ("cpu", False): Sizes(((256, 688), (688, 256)), (128, 512, 1024), (0.0, 0.3, 1.0), 64, (8, 16), DIRECTIONS,
                          (1026, 8192), (256, 1024), 256, _cpu_model(2, 256), torch.float32, True,
                          _CPU_SHAPES, extra_lora_shapes=_CPU_EXTRA_LORA),
    ("cpu", True): Sizes(((256, 688), (688, 256)), (512,), (0.3,), 64, (8,), DIRECTIONS,
                         (1026, 8192), (512,), 256, _cpu_model(2, 128), torch.float32, True,
                         _CPU_SHAPES + ", quick subset", extra_lora_shapes=_CPU_EXTRA_LORA),
}

# For the smoke test of the runner: every case in seconds.
TINY = Sizes(((32, 48),), (64,), (0.3,), 16, (4,), ("fwd+bwd",), (130,), (64,), 32,
             ModelShape(hidden=32, mlp=48, vocab=256, layers=1, heads=2, batch=1, seq=32, image_span=16),
             torch.float32, True, "tiny smoke-test shapes, float32", decode_tokens=(1,))


def sizes_for(device: torch.device, quick: bool, tiny: bool = False) -> Sizes:
    return TINY if tiny else PROFILES[(device.type, quick)]


def _timed_closure(forward: Callable[[], torch.Tensor], params: list[torch.Tensor], direction: str):
    """The closure to time for one direction of a differentiable computation.

    "fwd" runs the forward with autograd recording (as in training); "bwd" times only the gradient
    of a forward done once (graph kept); "fwd+bwd" both; "decode" the forward under no_grad (inference).
    A random output gradient stands in for the rest of the network (a scalar loss gets 1).
    """
    if direction == "fwd":
        return forward
    if direction == "decode":  # inference: no autograd graph
        return torch.no_grad()(forward)
    out = forward()
    grad_out = torch.randn_like(out) if out.dim() else None
    if direction == "bwd":
        return functools.partial(torch.autograd.grad, out, params, grad_out, retain_graph=True)
    del out  # "fwd+bwd" builds a fresh graph each call; this one would only hold memory
    return lambda: torch.autograd.grad(forward(), params, grad_out)


def ours_backends(device, op: str) -> tuple[str, ...]:
    """The backends the "ours" rows run: on CPU the torch reference and, when built, the native kernels;
    elsewhere what "auto" picks."""
    if device.type == "cpu":
        return ("torch", "native") if mk.backends.native_available() else ("torch",)
    return (mk.backends.resolve("auto", device, op),)


def _randn(*shape, device, dtype, scale=1.0, grad=False):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(grad)


def routed_lora_build(impl: str, k: int, n: int, tokens: int, share: float, span: int, rank: int,
                      direction: str, device, dtype, backend: str = "auto"):
    def build():
        if impl == "torch grouped_mm":
            reason = baselines.grouped_mm_unavailable_reason(device, dtype)
            if reason:
                raise CaseSkipped(reason)
        torch.manual_seed(0)
        num_experts = sum(EXPERTS_PER_MODALITY)
        modality = image_span_modality(1, tokens, share, span, device)[0]
        x = _randn(tokens, k, device=device, dtype=dtype, grad=True)
        weight = _randn(n, k, device=device, dtype=dtype, scale=k ** -0.5)
        lora_a = _randn(num_experts, rank, k, device=device, dtype=dtype, scale=k ** -0.5, grad=True)
        lora_b = _randn(num_experts, n, rank, device=device, dtype=dtype, scale=1e-2, grad=True)
        router = _randn(num_experts, k, device=device, dtype=dtype, scale=k ** -0.5, grad=True)
        if impl == FLOOR:
            return _timed_closure(lambda: F.linear(x, weight), [x], direction)
        layer, routing = {
            "naive MoDE layer": (baselines.naive_mode_lora, modality),
            "PEFT loop": (baselines.peft_loop_lora, modality),
            "torch grouped_mm": (baselines.grouped_mm_lora, modality),
            # A model plans once per forward for all its adapted layers: planning is not per layer.
            "ours": (functools.partial(mk.modality_lora_linear, backend=backend),
                     mk.plan_routing(modality, len(EXPERTS_PER_MODALITY))),
        }[impl]
        return _timed_closure(
            lambda: layer(x, weight, None, routing, lora_a, lora_b, router,
                          experts_per_modality=EXPERTS_PER_MODALITY, scaling=LORA_SCALING),
            [x, lora_a, lora_b, router], direction)
    return build


FLOOR = "base linear (floor)"
ROUTED_LORA_IMPLS = ((FLOOR, True), ("naive MoDE layer", True), ("PEFT loop", True),
                     ("torch grouped_mm", True), ("ours", False))


def routed_lora_cases(sizes: Sizes, device) -> Iterator[Case]:
    backends = ours_backends(device, "routed_lora")

    def group(direction, k, n, tokens, share, span, rank):
        shape = f"K={k} N={n} T={tokens} img={share:.0%} r={rank} E=(4,1)"
        if span != sizes.image_span:
            shape += f" span={span}"
        floor = None
        if direction == "fwd+bwd":
            modality = image_span_modality(1, tokens, share, span, "cpu")[0]
            per_modality = modality.bincount(minlength=len(EXPERTS_PER_MODALITY)).tolist()
            floor = routed_lora_flop_floor(k, n, per_modality, EXPERTS_PER_MODALITY, rank)
        for impl, is_baseline in ROUTED_LORA_IMPLS:
            for backend in backends if impl == "ours" else ("auto",):
                label = f"ours ({backend})" if impl == "ours" else impl
                build = routed_lora_build(impl, k, n, tokens, share, span, rank, direction, device, sizes.dtype,
                                          backend)
                yield Case(f"routed LoRA {direction}", shape, label, build, is_baseline, tokens, floor)

    for direction in sizes.directions:
        for (k, n) in sizes.linear_shapes:
            for tokens in sizes.tokens:
                for share in sizes.image_shares:
                    for rank in sizes.ranks:
                        yield from group(direction, k, n, tokens, share, sizes.image_span, rank)
    for k, n, tokens, share, span in sizes.extra_lora_shapes:
        yield from group("fwd+bwd", k, n, tokens, share, span, sizes.ranks[0])
    # Decode: a few text tokens per step, forward only, against the base linear alone.
    for (k, n) in sizes.linear_shapes:
        for tokens in sizes.decode_tokens:
            shape = f"K={k} N={n} T={tokens} text r={sizes.ranks[0]} E=(4,1)"
            for impl, is_baseline in ((FLOOR, True), ("ours", False)):
                for backend in backends if impl == "ours" else ("auto",):
                    label = f"ours ({backend})" if impl == "ours" else impl
                    build = routed_lora_build(impl, k, n, tokens, 0.0, sizes.image_span, sizes.ranks[0], "decode",
                                              device, sizes.dtype, backend)
                    yield Case("routed LoRA decode fwd", shape, label, build, is_baseline, tokens)


def _liger_loss(student_hidden, teacher_hidden, weight):
    if student_hidden.device.type != "cuda":
        raise CaseSkipped("Liger-Kernel runs on GPUs only")
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, or built for another torch) skips it
        raise CaseSkipped(f"liger_kernel not importable: {type(exc).__name__}: {exc}") from exc
    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=KD_TEMPERATURE)  # beta 0: forward KL(teacher || student)
    return lambda: loss(student_hidden, weight, teacher_hidden, weight, None)  # no shift labels: every position


def kd_build(impl: str, positions: int, vocab: int, hidden: int, device, dtype, backend: str = "auto"):
    def build():
        torch.manual_seed(0)
        student_hidden = _randn(positions, hidden, device=device, dtype=dtype, grad=True)
        teacher_hidden = _randn(positions, hidden, device=device, dtype=dtype)
        weight = _randn(vocab, hidden, device=device, dtype=dtype, scale=hidden ** -0.5)  # frozen lm_head
        both_logits = lambda: (F.linear(student_hidden, weight), F.linear(teacher_hidden, weight))  # noqa: E731
        k = min(KD_TOPK, vocab)
        given = mk.teacher_topk(teacher_hidden, weight, k, backend=backend) if "given" in impl else None
        losses = {
            "naive top-k": lambda: baselines.naive_linear_kd_kl_topk(student_hidden, teacher_hidden, weight, topk=k,
                                                                     temperature=KD_TEMPERATURE),
            "ours fused-linear top-k": lambda: mk.fused_linear_kd_kl_loss(
                student_hidden, teacher_hidden, weight, temperature=KD_TEMPERATURE, topk=k, backend=backend),
            "ours given-teacher top-k": lambda: mk.fused_linear_kd_kl_loss(
                student_hidden, None, weight, teacher_topk=given, temperature=KD_TEMPERATURE, backend=backend),
            "naive": lambda: baselines.naive_linear_kd_kl(student_hidden, teacher_hidden, weight,
                                                          temperature=KD_TEMPERATURE),
            "reference chunked (torch)": lambda: mk.kd_kl_loss(*both_logits(), temperature=KD_TEMPERATURE,
                                                               backend="torch"),
            "ours on logits": lambda: mk.kd_kl_loss(*both_logits(), temperature=KD_TEMPERATURE, backend=backend),
            "ours fused-linear": lambda: mk.fused_linear_kd_kl_loss(student_hidden, teacher_hidden, weight,
                                                                    temperature=KD_TEMPERATURE, backend=backend),
        }
        loss = _liger_loss(student_hidden, teacher_hidden, weight) if impl == "Liger fused linear JSD" \
            else losses[impl]
        return _timed_closure(loss, [student_hidden], "fwd+bwd")
    return build


KD_IMPLS = (("naive", True), ("reference chunked (torch)", False), ("ours on logits", False),
            ("ours fused-linear", False), ("Liger fused linear JSD", True), ("naive top-k", True),
            ("ours fused-linear top-k", False), ("ours given-teacher top-k", False))
# The teacher's top k of the top-k cases (KD_TOPK: MoDE's official code distils the top 256 image codes); the
# given-teacher case has it computed before the timing (a cache's), so it times the student's part only.


# Where the fused-linear form's memory bound (a tenth of the naive path's peak) is checked on CPU:
# 2^28 logits, the shape of issue 14 (on CUDA the Anole-7B grid above already has P=16384, V=65536).
KD_CPU_MEMORY_SHAPE = (8192, 32768, 64)  # positions, vocab, hidden


def kd_cases(sizes: Sizes, device) -> Iterator[Case]:
    backends = ours_backends(device, "kd_kl")
    shapes = [(positions, vocab, sizes.kd_hidden) for vocab in sizes.kd_vocabs for positions in sizes.kd_positions]
    if device.type == "cpu" and sizes is not TINY:
        shapes.append(KD_CPU_MEMORY_SHAPE)
    for positions, vocab, hidden in shapes:
        shape = f"P={positions} V={vocab} H={hidden} T={KD_TEMPERATURE:g}"
        for impl, is_baseline in KD_IMPLS:
            for backend in backends if impl.startswith("ours") else ("auto",):
                label = f"{impl} ({backend})" if impl.startswith("ours") else impl
                yield Case("KD loss fwd+bwd (from hidden states)", shape, label,
                           kd_build(impl, positions, vocab, hidden, device, sizes.dtype, backend), is_baseline,
                           positions)


def train_step_cases(sizes: Sizes, device) -> Iterator[Case]:
    shape = sizes.model
    k = min(KD_TOPK, shape.image_codes[1] - shape.image_codes[0])
    for impl, label, is_baseline in (("naive", "naive MoDE layers + naive KD", True),
                                     ("ours", "mode.MoDELinear + fused-linear KD", False),
                                     ("ours top-k", f"ours, top-{k} KD, teacher forward (no cache)", False),
                                     ("ours top-k cached", f"ours, top-{k} KD, teacher cache", False)):
        yield Case("training step (adapter grads)", shape.label(), label,
                   lambda impl=impl: training_step(shape, impl, device, sizes.dtype)[0], is_baseline,
                   shape.tokens_per_step)


def all_cases(sizes: Sizes, device) -> list[Case]:
    return [*routed_lora_cases(sizes, device), *kd_cases(sizes, device), *train_step_cases(sizes, device)]
