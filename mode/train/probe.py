"""The gradient-conflict probe: does a step on the task loss change the generation loss?

A step -lr * g_task changes the generation loss by about -lr * <g_gen, g_task> (first order). The
probe measures, per group of adapter parameters, the cosine between the gradient of the task
(understanding) loss and that of the generation loss (next-token cross-entropy on image tokens).
Negative: the task step makes generation worse (the inter-modal forgetting MoDE's paper blames);
0: no first-order interference.

Groups:
    "text_experts"  MoDE: the rows (lora_A, lora_B, router) of the text modality's experts
    "image_expert"  MoDE: the rows of the image modality's expert(s)
    "shared"        adapters not split by modality: every adapter of a method that routes all
                    tokens alike (``shared=True``: the trainer's lora / moelora), a routed layer
                    with one modality, or any other trainable parameter (plain PEFT LoRA)
    "total"         every trainable parameter
A group that one of the two losses does not reach (zero gradient) has cosine 0.0, not NaN: its
update cannot change the other loss to first order (the interference term is exactly 0), and 0
keeps metrics.json plain JSON. E.g. the image expert of a task batch holding no image token.
A group that neither loss reaches (an idle expert, such as the image expert of a method that
routes every token as text) is left out.

    cos = conflict_cosines(model, task_batch, generation_batch)   # {"text_experts": -0.12, ...}
    plot_conflict({"mode": history_mode, "lora": history_lora}, "conflict.png")
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..layer import routed_layers
from ..modality import IMAGE, ModalitySpec
from ..model import routing_state
from ..workloads.scoring import scored, target_logits
from . import distributed

MODALITY_GROUPS = ("text_experts", "image_expert")  # group of the experts of modality 0, 1
SHARED, TOTAL = "shared", "total"

# (parameter, rows of its leading expert dimension or None for the whole tensor) per group
Groups = dict[str, list[tuple[nn.Parameter, slice | None]]]


def adapter_groups(model: nn.Module, shared: bool = False) -> Groups:
    """Every trainable parameter of ``model`` in its probe group (``TOTAL`` excluded); with
    ``shared`` all of them in ``SHARED``."""
    groups: Groups = {}
    in_routed = set()
    for _, layer in routed_layers(model):
        experts = layer.experts_per_modality
        for param in layer.parameters():
            if not param.requires_grad:
                continue
            in_routed.add(id(param))
            if shared or len(experts) == 1 or param.shape[0] != sum(experts):
                groups.setdefault(SHARED, []).append((param, None))
                continue
            start = 0
            for modality, count in enumerate(experts):  # experts are ordered by modality
                groups.setdefault(MODALITY_GROUPS[modality], []).append((param, slice(start, start + count)))
                start += count
    for param in model.parameters():
        if param.requires_grad and id(param) not in in_routed:
            groups.setdefault(SHARED, []).append((param, None))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to probe")
    return groups


def next_token_ce(model: nn.Module, batch: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the positions whose *next* token is selected by
    ``targets`` (bool [B, T], aligned with input_ids), normalised over the global batch under
    DDP (logits as ``mode.workloads.scoring.target_logits`` computes them)."""
    logits, target_ids = target_logits(model, batch, targets)
    loss_sum = torch.nn.functional.cross_entropy(logits, target_ids, reduction="sum")
    return distributed.global_mean(loss_sum, target_ids.numel())


def task_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The understanding loss: next-token CE on the labelled (answer) tokens."""
    return next_token_ce(model, batch, scored(batch))


def generation_loss(model: nn.Module, batch: Mapping[str, Tensor], spec: ModalitySpec) -> Tensor:
    """The generation loss: next-token CE on the image tokens (by ``spec``) among the scored ones."""
    image = spec.modality_ids(batch["input_ids"]) == IMAGE
    return next_token_ce(model, batch, image & scored(batch))


def conflict_cosines(model: nn.Module, task_batch: Mapping[str, Tensor], generation_batch: Mapping[str, Tensor],
                     spec: ModalitySpec | None = None, shared: bool = False) -> dict[str, float]:
    """Cosine between the task-loss and generation-loss gradients, per group and in total.

    ``model``: with MoDE layers (``mode.apply_mode``), PEFT adapters, or any trainable
    parameters; a DDP-wrapped model is probed through its module, with gradients averaged over
    ranks (the cosine of the global batch). ``spec`` tells image tokens from text; default: the
    model's MoDE config. Batches: ``input_ids`` [B, T], optional ``attention_mask``, ``labels``.
    ``shared``: one group for all adapters, for methods without a modality split (the
    generation loss still scores the image tokens by ``spec``, which then must be the real one).

    Leaves the model as it was: gradients come from ``torch.autograd.grad`` (``.grad`` buffers
    untouched), the passes run in eval mode (no dropout, so the training random stream is not
    consumed either) and every module's train/eval flag is restored.
    """
    model = distributed.unwrap(model)
    if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
        raise ValueError("conflict_cosines: FSDP2-sharded models are not supported (their adapter gradients are "
                         "sharded); probe with DDP or in one process")
    if spec is None:
        if not routed_layers(model):
            raise ValueError("conflict_cosines: the model has no MoDE layers to take the modality spec from; "
                             "pass spec= (which token ids are image tokens)")
        spec = routing_state(model).config.modality
    groups = adapter_groups(model, shared)
    params = list(dict.fromkeys(p for members in groups.values() for p, _ in members))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        grads = []
        for loss in (lambda: task_loss(model, task_batch), lambda: generation_loss(model, generation_batch, spec)):
            g = torch.autograd.grad(loss(), params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
            grads.append({id(p): distributed.all_reduce_mean(gi.double()) for p, gi in zip(params, g)})
    finally:
        for module, was_training in training.items():
            module.training = was_training
    task_grad, gen_grad = grads

    def cosine(members: Sequence[str]) -> float | None:
        dot = task_sq = gen_sq = 0.0
        for param, rows in members:
            a, b = task_grad[id(param)], gen_grad[id(param)]
            if rows is not None:
                a, b = a[rows], b[rows]
            dot += float((a * b).sum())
            task_sq += float((a * a).sum())
            gen_sq += float((b * b).sum())
        if task_sq == 0.0 and gen_sq == 0.0:
            return None  # neither loss reaches the group
        return 0.0 if task_sq == 0.0 or gen_sq == 0.0 else dot / math.sqrt(task_sq * gen_sq)

    cosines = {name: cosine(members) for name, members in groups.items()}
    cosines[TOTAL] = cosine([(p, None) for p in params])
    return {name: value for name, value in cosines.items() if value is not None}


def plot_conflict(history: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike,
                  title: str = "Gradient conflict: cosine(task gradient, generation gradient)") -> None:
    """Plot cosine vs training step, one panel per group, one line per method.

    ``history``: method -> list of probe entries ``{"step": int, <group>: cosine, ...}`` (other
    keys, such as "task", are ignored). Writes a PNG to ``path``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in (TOTAL, SHARED) + MODALITY_GROUPS
              if any(g in entry for entries in history.values() for entry in entries)]
    if not groups:
        raise ValueError("plot_conflict: the history holds no probe entry")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        for index, (method, entries) in enumerate(history.items()):  # one color per method in every panel
            points = [(e["step"], e[group]) for e in entries if group in e]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker=".", label=method, color=colors[index % len(colors)])
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.legend()
    axes[0][0].set_ylabel("cosine")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
