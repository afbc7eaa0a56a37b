"""A Chameleon-shaped decoder with fewer layers, for timing one MoDE training step.

Frozen base (embeddings, attention, MLP, lm_head); MoDE adapters on gate/up/down of every MLP:
experts (4, 1), rank 8, scaling 2, dropout 0.05 on the adapter input. The same model with adapters
off is the teacher. Attention is plain causal SDPA without rotary embeddings or qk-norm: the step's
cost that MoDE changes is in the adapted MLPs and the KD loss, and both implementations share the rest.

One step = CE on a task stream + 0.3 * T^2 KL(teacher || student) on an image-generation stream,
over the image-code slice of the vocabulary, gradients for the adapters only.
- "naive": ``NaiveMoDELinear`` layers (``bench.baselines.naive_mode_lora``: routing by modality ids in
  every layer) and ``naive_linear_kd_kl`` (both logits materialised).
- "ours": ``mode.MoDELinear`` layers (``mk.modality_lora_linear``) given one routing plan per forward,
  and ``mk.fused_linear_kd_kl_loss``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mode_kernels as mk
from bench.baselines import naive_linear_kd_kl, naive_mode_lora

EXPERTS_PER_MODALITY = (4, 1)
LORA_RANK = 8
LORA_SCALING = 2.0
LORA_DROPOUT = 0.05
KD_WEIGHT = 0.3
KD_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    mlp: int
    vocab: int
    layers: int
    heads: int
    batch: int
    seq: int
    image_span: int

    @property
    def image_codes(self) -> tuple[int, int]:
        """The vocab slice KD runs on: Anole's 8192 image codes at 4..8195 of 65536, scaled with the vocab."""
        return 4, 4 + self.vocab // 8

    @property
    def tokens_per_step(self) -> int:
        """Student tokens per step: the task stream and the generation stream."""
        return 2 * self.batch * self.seq

    def label(self) -> str:
        return (f"H={self.hidden} MLP={self.mlp} V={self.vocab} L={self.layers} "
                f"B={self.batch}x{self.seq} x2 streams")


def _frozen(*shape, fan_in, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(fan_in), requires_grad=False)


class NaiveMoDELinear(nn.Module):
    """The baseline layer: ``mode.MoDELinear``'s parameters and interface, run by ``naive_mode_lora``."""

    teacher = False  # as mode.MoDELinear: True returns the frozen base output (the KD teacher)

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        num_experts, k, n = sum(EXPERTS_PER_MODALITY), base_layer.in_features, base_layer.out_features
        like = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(num_experts, LORA_RANK, k, **like))
        self.lora_B = nn.Parameter(torch.empty(num_experts, n, LORA_RANK, **like))
        self.router = nn.Parameter(torch.empty(num_experts, k, **like))
        self.lora_dropout = nn.Dropout(LORA_DROPOUT)

    def forward(self, x: Tensor, modality: Tensor) -> Tensor:
        if self.teacher:
            return self.base_layer(x)
        return naive_mode_lora(x, self.base_layer.weight, self.base_layer.bias, modality, self.lora_A, self.lora_B,
                               self.router, experts_per_modality=EXPERTS_PER_MODALITY, scaling=LORA_SCALING,
                               lora_input=self.lora_dropout(x))


def adapted_linear(k: int, n: int, impl: str, device, dtype) -> nn.Module:
    """A frozen bias-free k -> n linear with MoDE experts: ``mode.MoDELinear`` (ours) or the naive layer.

    Both get the same random experts; B is small and non-zero (PEFT starts it at 0) so that every
    term of the backward does real work."""
    base = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    if impl == "naive":
        layer = NaiveMoDELinear(base)
    else:
        from mode import MoDELinear
        layer = MoDELinear(base, rank=LORA_RANK, alpha=LORA_SCALING * LORA_RANK,
                           experts_per_modality=EXPERTS_PER_MODALITY, dropout=LORA_DROPOUT)
    with torch.no_grad():
        layer.base_layer.weight.normal_(0, k ** -0.5)
        layer.lora_A.normal_(0, k ** -0.5)
        layer.lora_B.normal_(0, 1e-3)
        layer.router.normal_(0, k ** -0.5)
    return layer


@contextlib.contextmanager
def teacher(model: nn.Module):
    """Adapters off in every MoDE layer (naive or ours) for the block: the frozen teacher."""
    layers = [m for m in model.modules() if hasattr(m, "teacher") and m is not model]
    for layer in layers:
        layer.teacher = True
    try:
        yield
    finally:
        for layer in layers:
            layer.teacher = False


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, impl: str, device, dtype):
        super().__init__()
        h = shape.hidden
        self.heads = shape.heads
        self.qkv = _frozen(3 * h, h, fan_in=h, device=device, dtype=dtype)
        self.out = _frozen(h, h, fan_in=h, device=device, dtype=dtype)
        self.gate = adapted_linear(h, shape.mlp, impl, device, dtype)
        self.up = adapted_linear(h, shape.mlp, impl, device, dtype)
        self.down = adapted_linear(shape.mlp, h, impl, device, dtype)

    def forward(self, x: Tensor, routing) -> Tensor:
        b, s, h = x.shape
        q, k, v = F.linear(F.rms_norm(x, (h,)), self.qkv).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + F.linear(attn, self.out)
        z = F.rms_norm(x, (h,))
        mlp = F.silu(self.gate(z, routing)) * self.up(z, routing)
        return x + self.down(mlp, routing)


class ChameleonShaped(nn.Module):
    def __init__(self, shape: ModelShape, impl: str, device, dtype):
        super().__init__()
        self.impl = impl
        self.embed = _frozen(shape.vocab, shape.hidden, fan_in=1, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(shape, impl, device, dtype) for _ in range(shape.layers))
        self.lm_head = _frozen(shape.vocab, shape.hidden, fan_in=shape.hidden, device=device, dtype=dtype)

    def hidden_states(self, ids: Tensor, modality: Tensor) -> Tensor:
        # The naive layer routes from the ids in every layer; ours plans once per forward for all layers.
        routing = modality if self.impl == "naive" else mk.plan_routing(modality, len(EXPERTS_PER_MODALITY))
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            x = layer(x, routing)
        return F.rms_norm(x, (x.shape[-1],))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def image_span_modality(batch: int, seq: int, image_share: float, span: int, device) -> Tensor:
    """Modality ids [batch, seq]: round(share * seq) image tokens per sequence in spans of at most
    ``span`` tokens, spread evenly (each span closes an equal segment: text first, then its image)."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    image_tokens = round(image_share * seq)
    num_spans = math.ceil(image_tokens / span) if image_tokens else 0
    segment = seq // max(num_spans, 1)
    for i in range(num_spans):
        length = min(span, image_tokens - i * span)
        end = seq if i == num_spans - 1 else (i + 1) * segment
        ids[:, end - length:end] = 1
    return ids


# the training step's KD variants (``training_step``'s impl): the whole image-code slice from both models' hidden
# states; the teacher's top k (KD_TOPK, the official MoDE code's) given to the loss, computed in the step (the
# teacher's forward, its GEMM over the slice and the selection: mode-train --no-kd-cache) or read from the
# trainer's teacher cache (computed once per run: the step skips the teacher)
TRAIN_STEP_IMPLS = ("naive", "ours", "ours top-k", "ours top-k cached")
KD_TOPK = 256


def training_step(shape: ModelShape, impl: str, device, dtype) -> tuple[Callable[[], object], list[Tensor]]:
    """Build the model and a batch; return the step closure (loss forward + adapter gradients). ``impl``: one of
    ``TRAIN_STEP_IMPLS``."""
    torch.manual_seed(0)
    model = ChameleonShaped(shape, impl, device, dtype).train()
    params = model.adapter_parameters()
    ids = torch.randint(shape.vocab, (2, shape.batch, shape.seq), device=device)
    modality = image_span_modality(shape.batch, shape.seq, 0.5, shape.image_span, device)
    lo, hi = shape.image_codes
    ids[:, modality == 1] = torch.randint(lo, hi, ids[:, modality == 1].shape, device=device)
    task_ids, gen_ids = ids[0], ids[1]
    labels = task_ids.roll(-1, dims=1)
    kd = naive_linear_kd_kl if impl == "naive" else mk.fused_linear_kd_kl_loss
    k = min(KD_TOPK, hi - lo)

    def teacher_topk():
        with torch.no_grad(), teacher(model):
            return mk.teacher_topk(model.hidden_states(gen_ids, modality), model.lm_head, k, vocab_range=(lo, hi))

    cached = teacher_topk() if impl == "ours top-k cached" else None

    def step():
        task_hidden = model.hidden_states(task_ids, modality)
        ce = F.cross_entropy(F.linear(task_hidden, model.lm_head).float().flatten(0, 1), labels.flatten())
        student_hidden = model.hidden_states(gen_ids, modality)
        if impl in ("naive", "ours"):
            with torch.no_grad(), teacher(model):
                teacher_hidden = model.hidden_states(gen_ids, modality)
            distill = kd(student_hidden, teacher_hidden, model.lm_head, temperature=KD_TEMPERATURE,
                         vocab_range=(lo, hi))
        else:
            top = cached if cached is not None else teacher_topk()
            distill = mk.fused_linear_kd_kl_loss(student_hidden, None, model.lm_head, temperature=KD_TEMPERATURE,
                                                 vocab_range=(lo, hi), teacher_topk=top)
        return torch.autograd.grad(ce + KD_WEIGHT * distill, params)

    return step, params
