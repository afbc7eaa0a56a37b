"""The understanding tasks of the digits benchmark, scored on a model (pretrained or adapted).

Batched with a KV cache and calling the model with `input_ids` only (so it works unchanged once
MoDE layers are applied: they derive each token's modality from its id): `task_scores` gives the
exact match of the greedy answer of an understanding task, whether its first word names the digit,
and the teacher-forced NLL of the answer.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...hf.models import continue_sequences, prefill
from ..scoring import continuation_nll
from . import data as digits
from .data import DigitsVocab, Task


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos_id: int,
                  prefilled: Any = None) -> torch.Tensor:
    """Greedy continuation of equal-length prompts [B, L] with a KV cache -> new tokens [B, T].

    Rows that emitted eos keep emitting eos; decoding stops early once every row has.
    ``prefilled``: the prompts already run through the decoder (`mode.hf.models.prefill`).
    """
    return continue_sequences(model, prompts, max_new_tokens, lambda logits: logits.argmax(dim=-1), eos_id,
                              prefilled=prefilled).cpu()


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def task_scores(model: nn.Module, vocab: DigitsVocab, task: Task, images: np.ndarray, labels: np.ndarray,
                batch_size: int = 512, progress: bool = False) -> dict[str, float]:
    """An understanding task's scores on these images:
    ``acc``: exact match of the greedy answer (answer words followed by eos);
    ``digit_acc``: the greedy answer's first word is the target's (every digits answer opens with
    the digit's name), a skill that survives a changed answer format;
    ``answer_nll``: teacher-forced NLL of the target answer, nats per token (as ``scoring.answer_nll``).
    The prompts go through the model once: greedy decoding and the answer NLL both continue from them."""
    was_training = model.training
    model.eval()
    correct = digit_correct = 0
    nll_sum, nll_count = 0.0, 0
    examples = digits.task_examples(vocab, task, images, labels)
    chunks = [examples[rows] for rows in batch_slices(len(examples), batch_size)]
    for chunk in tqdm(chunks, desc=f"eval {task.name}", disable=not progress):
        prompts = torch.tensor([e.prompt for e in chunk])  # one task: all prompts have the same length
        prefilled = prefill(model, prompts)
        batch = digits.collate(chunk, vocab.pad)  # prompt then target: the target starts at column L
        chunk_sum, chunk_count = continuation_nll(model, prefilled, batch["input_ids"][:, prompts.shape[1]:],
                                                  batch["labels"][:, prompts.shape[1]:])
        nll_sum, nll_count = nll_sum + chunk_sum, nll_count + chunk_count
        answers = greedy_decode(model, prompts, digits.MAX_ANSWER_TOKENS, vocab.eos, prefilled=prefilled)
        for e, answer in zip(chunk, answers.tolist()):
            correct += answer[: len(e.target)] == e.target
            digit_correct += answer[0] == e.target[0]
    model.train(was_training)
    return {"acc": correct / len(examples), "digit_acc": digit_correct / len(examples),
            "answer_nll": nll_sum / nll_count}
