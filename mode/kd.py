"""kd_loss: distil the frozen model (the teacher: adapters off) into the MoDE student on a batch.

Both passes run the decoder only and hand their final hidden states and the weight of the head
that scores image codes (``mode.families``: the lm_head, or Janus's generation head) to
``mode_kernels.fused_linear_kd_kl_loss``, so no [positions, vocab] logits are ever held, and
model-specific logit post-processing in the CausalLM forward (Chameleon sets image-code logits
to the most negative float) is bypassed. A head's bias is folded into its weight (``fold_bias``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

import mode_kernels as mk

from .constants import IGNORE_INDEX
from .families import ImageHead, family_of
from .hf.models import decoder_of
from .modality import ModalitySpec
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


def fold_bias(head: ImageHead, *hidden: Tensor | None) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """(hidden states, weight) with the head's bias folded in: a ones column appended to each hidden state
    (None stays None) and the bias appended to the weight as a column, so that ``hidden @ weight.T`` is the
    biased logits and the fused op needs no bias argument."""
    if head.bias is None:
        return hidden, head.weight
    weight = torch.cat([head.weight, head.bias[:, None].to(head.weight.dtype)], dim=1)
    return tuple(None if h is None else torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1) for h in hidden), weight


def kd_vocab_range(model: nn.Module, spec: ModalitySpec | None = None) -> tuple[int, int]:
    """The slice KD compares on by default: the MoDE config's ``kd_vocab_range``, else the family's image head's
    (Janus: its whole generation head), else the image-code range of ``spec`` (default the model's own modality
    spec; a text-only method's matches no token, so a trainer passes the real one)."""
    config = routing_state(model).config
    fixed = config.kd_vocab_range or family_of(model).image_head(model).vocab_range
    if fixed is not None:
        return fixed
    return (config if spec is None else replace(config, modality=spec)).resolved_kd_vocab_range()


class _Stream(NamedTuple):
    """A generation-stream batch as both KD passes see it."""
    head: ImageHead
    inputs: dict
    temperature: float
    vocab_range: tuple[int, int]


def _stream(model: nn.Module, batch: Mapping[str, Tensor], temperature: float | None,
            vocab_range: tuple[int, int] | None) -> _Stream:
    """The family's image head, the decoder's inputs (modality ids from the model's own spec: a text-only
    method's matches no token, not the family's) and the resolved temperature and vocabulary slice."""
    if "input_ids" not in batch:
        raise ValueError("batch: expected an 'input_ids' entry [B, T]")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"batch['input_ids']: expected a [B, T] tensor, got "
                         f"{list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    config = routing_state(model).config
    family = family_of(model)
    head = family.image_head(model)
    modality_ids = batch.get("modality_ids")
    modality_ids = config.modality.modality_ids(input_ids) if modality_ids is None else modality_ids
    return _Stream(head, family.stream_inputs(model, input_ids, batch.get("attention_mask"), modality_ids),
                   config.kd_temperature if temperature is None else temperature,
                   vocab_range or kd_vocab_range(model))


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
            ``modality_ids`` [B, T] (optional; else derived from input_ids). The ids are the model
            family's record ids (``mode.families``; Janus: image codes after the text vocabulary).
        temperature: applied once to both logits; default the MoDE config's ``kd_temperature`` (2).
        vocab_range: [lo, hi) of the image head's outputs compared on; default the config's
            ``kd_vocab_range``, else the family's (Janus: its whole generation head), else the
            image-code range of the modality spec.
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
    stream = _stream(model, batch, temperature, vocab_range)
    head, decoder = stream.head, decoder_of(model)

    # Position t predicts token t + 1: the last position has nothing to distil.
    teacher_hidden = None
    if teacher is None:
        with torch.no_grad(), teacher_mode(model):
            teacher_hidden = head.features(decoder(**stream.inputs, use_cache=False)[0][:, :-1])
    student_hidden = head.features(decoder(**stream.inputs, use_cache=False)[0][:, :-1])
    (student_hidden, teacher_hidden), weight = fold_bias(head, student_hidden, teacher_hidden)
    return mk.fused_linear_kd_kl_loss(student_hidden, teacher_hidden, weight, teacher_topk=teacher,
                                      temperature=stream.temperature, mask=kd_positions(batch),
                                      vocab_range=stream.vocab_range,
                                      topk=topk, topk_tail=topk_tail, reduction=reduction, backend=backend)


def kd_teacher_topk(model: nn.Module, batch: Mapping[str, Tensor], k: int, *, temperature: float | None = None,
                    vocab_range: tuple[int, int] | None = None, logsumexp: bool = False,
                    backend: str = "auto") -> mk.TeacherTopk:
    """The teacher's top k over a batch's positions ([B, T-1, k]; the model with its adapters off), for
    ``kd_loss(..., teacher=...)``: computed once, it can be stored and reused (the teacher is frozen)."""
    stream = _stream(model, batch, temperature, vocab_range)
    with torch.no_grad(), teacher_mode(model):
        hidden = stream.head.features(decoder_of(model)(**stream.inputs, use_cache=False)[0][:, :-1])
        (hidden,), weight = fold_bias(stream.head, hidden)
        return mk.teacher_topk(hidden, weight, k, vocab_range=stream.vocab_range, temperature=stream.temperature,
                               logsumexp=logsumexp, backend=backend)
