"""kd_loss: distil the frozen model (the teacher: adapters off) into the MoDE student on a batch.

Both passes run the decoder only and hand their final hidden states and the lm_head weight to
``mode_kernels.fused_linear_kd_kl_loss``, so no [positions, vocab] logits are ever held, and
model-specific logit post-processing in the CausalLM forward (Chameleon sets image-code logits
to the most negative float) is bypassed.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

import mode_kernels as mk

from .constants import IGNORE_INDEX
from .hf.models import decoder_of, hf_model
from .model import routing_state, teacher_mode


def kd_positions(batch: Mapping[str, Tensor]) -> Tensor:
    """bool [B, T-1]: position t is distilled when the token t+1 it predicts is a target
    (``labels[:, t+1] != -100``); without labels, when it is a real token
    (``attention_mask[:, t+1] == 1``); without either, always."""
    input_ids = batch["input_ids"]
    if batch.get("labels") is not None:
        return batch["labels"][:, 1:] != IGNORE_INDEX
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"][:, 1:].bool()
    return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)


def kd_loss(model: nn.Module, batch: Mapping[str, Tensor], *, temperature: float | None = None,
            vocab_range: tuple[int, int] | None = None, topk: int | None = None, topk_tail: bool = False,
            teacher: mk.TeacherTopk | None = None, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """T^2 * KL(teacher || student) of the next-token distributions over a vocabulary slice.

    Args:
        model: a model with MoDE layers (``mode.apply_mode``); its adapters switched off are the teacher.
        batch: a Hugging Face-style causal LM batch (e.g. of the image-generation stream):
            ``input_ids`` [B, T] (required); ``attention_mask`` [B, T] (1 real, 0 padding; optional);
            ``labels`` [B, T] aligned with input_ids as HF causal LMs take them, -100 where no
            target (optional; selects the distilled positions, see ``kd_positions``);
            ``modality_ids`` [B, T] (optional; else derived from input_ids).
        temperature: applied once to both logits; default the MoDE config's ``kd_temperature`` (2).
        vocab_range: [lo, hi) compared on; default the config's ``kd_vocab_range``, else the
            image-code range of its modality spec.
        topk: only the teacher's k largest logits in the slice count, both distributions
            renormalised on them (the official MoDE code distils the teacher's top 256 image
            codes); None (default): the whole slice.
        topk_tail: the teacher's mass outside its top k as one more outcome of both distributions.
        teacher: the teacher's top k given (``mode_kernels.TeacherTopk`` with [B, T-1, k] ids and logits, e.g.
            from a cache; ``kd_teacher_topk`` computes them): the teacher's forward is skipped.
        reduction: "mean" over distilled positions, "sum", or "none" ([B, T-1]).
        backend: of the fused KD op ("auto", "torch", "triton").
    Returns:
        The loss; gradients reach the adapters through the student pass only.
    """
    if "input_ids" not in batch:
        raise ValueError("batch: expected an 'input_ids' entry [B, T]")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"batch['input_ids']: expected a [B, T] tensor, got "
                         f"{list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    config = routing_state(model).config
    temperature = config.kd_temperature if temperature is None else temperature
    vocab_range = config.resolved_kd_vocab_range() if vocab_range is None else vocab_range
    head = hf_model(model).get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"kd_loss: expected a bias-free nn.Linear output head, got {head!r}")
    decoder = decoder_of(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "modality_ids") if batch.get(k) is not None}

    teacher_hidden = None
    if teacher is None:
        with torch.no_grad(), teacher_mode(model):
            teacher_hidden = decoder(**inputs, use_cache=False)[0][:, :-1]
    student_hidden = decoder(**inputs, use_cache=False)[0]
    # Position t predicts token t + 1: the last position has nothing to distil.
    return mk.fused_linear_kd_kl_loss(student_hidden[:, :-1], teacher_hidden, head.weight, teacher_topk=teacher,
                                      temperature=temperature, mask=kd_positions(batch), vocab_range=vocab_range,
                                      topk=topk, topk_tail=topk_tail, reduction=reduction, backend=backend)


def kd_teacher_topk(model: nn.Module, batch: Mapping[str, Tensor], k: int, *, temperature: float | None = None,
                 vocab_range: tuple[int, int] | None = None, logsumexp: bool = False,
                 backend: str = "auto") -> mk.TeacherTopk:
    """The teacher's top k over a batch's positions ([B, T-1, k]; the model with its adapters off), for
    ``kd_loss(..., teacher=...)``: computed once, it can be stored and reused (the teacher is frozen)."""
    config = routing_state(model).config
    temperature = config.kd_temperature if temperature is None else temperature
    vocab_range = config.resolved_kd_vocab_range() if vocab_range is None else vocab_range
    head = hf_model(model).get_output_embeddings()
    inputs = {k_: batch[k_] for k_ in ("input_ids", "attention_mask", "modality_ids") if batch.get(k_) is not None}
    with torch.no_grad(), teacher_mode(model):
        hidden = decoder_of(model)(**inputs, use_cache=False)[0][:, :-1]
        return mk.teacher_topk(hidden, head.weight, k, vocab_range=vocab_range, temperature=temperature,
                               logsumexp=logsumexp, backend=backend)
