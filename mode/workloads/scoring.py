"""Teacher-forced scores shared by the workloads (and the trainer's gradient-conflict probe): the scored
positions of a batch, the logits of selected positions, and the mean NLL of the answer tokens (a graded
companion of exact match: it moves before the greedy answer flips)."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..constants import IGNORE_INDEX
from ..hf.models import cache_in, cache_keyword, decoder_of, hf_model
from ..model import routing_state


def scored(batch: Mapping[str, Tensor]) -> Tensor:
    """bool [B, T]: positions with a target (labels != -100, else attention_mask, else all)."""
    if batch.get("labels") is not None:
        return batch["labels"] != IGNORE_INDEX
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def target_logits(model: nn.Module, batch: Mapping[str, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
    """(float32 logits [N, vocab], target ids [N]) of the positions whose *next* token is selected
    by ``targets`` (bool [B, T], aligned with input_ids). Logits come from the decoder and the head
    weight on those positions only: no full [B, T, vocab] logits, and no model-specific logit
    masking (Chameleon masks image codes), so the softmax is over the whole vocabulary."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "modality_ids") if batch.get(k) is not None}
    if batch.get("pixel_values") is not None:  # Janus: the vision tower's features at the placeholders
        hidden = with_pixels(model, inputs, batch["pixel_values"])[0]
    else:
        hidden = decoder_of(model)(**inputs, use_cache=False)[0]
    selected = targets[:, 1:]
    logits = hf_model(model).get_output_embeddings()(hidden[:, :-1][selected]).float()
    return logits, batch["input_ids"][:, 1:][selected]


def with_pixels(model: nn.Module, inputs: Mapping[str, Tensor], pixel_values: Tensor, use_cache: bool = False):
    """The multimodal model's decoder output (``model.model``, Janus's ``JanusModel``) on ids with
    image placeholders and their pixels. It hands the language model embeddings only, so the
    modality ids are given (from the model's own spec), through to the language model's routing hook."""
    if inputs.get("modality_ids") is None:
        inputs = {**inputs, "modality_ids": routing_state(model).config.modality.modality_ids(inputs["input_ids"])}
    pixels = pixel_values.to(inputs["input_ids"].device, next(model.parameters()).dtype)
    return hf_model(model).model(**inputs, pixel_values=pixels, use_cache=use_cache)


@torch.no_grad()
def answer_nll(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], masked_ids: Tensor | None = None) -> float:
    """Mean NLL (nats per answer token) of the labelled tokens (labels != -100) given everything
    before them, over all ``batches``, in eval mode (the model's train flag is restored).

    ``masked_ids``: ids left out of the softmax, as the model's own forward leaves them out (Chameleon's
    image codes): the score is then on the scale of the model's training loss. None: the whole vocabulary."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            logits, targets = target_logits(model, batch, batch["labels"] != IGNORE_INDEX)
            if masked_ids is not None:
                logits[:, masked_ids.to(logits.device)] = float("-inf")
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("answer_nll: the batches hold no labelled token")
    return total / count


@torch.no_grad()
def continuation_nll(model: nn.Module, prefilled: Any, continuation: Tensor, labels: Tensor) -> tuple[float, int]:
    """(sum, count) of the NLL (softmax over the whole vocabulary) of the labelled tokens of continuations
    [B, A] of prompts already run through the decoder (``prefilled``: `mode.hf.models.prefill`), each token
    given the prompt and the continuation before it. ``labels`` [B, A]: the token to score or -100.

    The same scores as `answer_nll` on the prompts followed by the continuations, without running the
    prompts again: only the continuation's first A - 1 tokens go through the decoder, on a copy of the
    prompts' KV cache (``prefilled`` is left as it was, for decoding). Call it in eval mode."""
    decoder, head = decoder_of(model), hf_model(model).get_output_embeddings()
    hidden = prefilled.last_hidden_state[:, -1:]  # predicts the continuation's first token
    if continuation.shape[1] > 1:
        cache = copy.deepcopy(cache_in(prefilled))
        out = decoder(input_ids=continuation[:, :-1].to(hidden.device), use_cache=True,
                      **{cache_keyword(decoder): cache})
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)
    labels = labels.to(hidden.device)
    selected = labels != IGNORE_INDEX
    logits = head(hidden[selected]).float()
    return torch.nn.functional.cross_entropy(logits, labels[selected], reduction="sum").item(), int(selected.sum())
