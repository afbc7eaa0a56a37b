"""Exact match of greedy answers on a local model's held-out JSONL records.

    acc = exact_match_accuracy(model, load_jsonl("gqa_test.jsonl", vocab_size(model)))  # {"gqa": 0.41}
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ...constants import IGNORE_INDEX
from ...hf.models import continue_sequences, model_device
from ..scoring import with_pixels
from .data import JsonlDataset


def equal_key_batches(keys: Sequence, batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of equal key (a prompt's length: no padding, so nothing to mask)."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    for indices in by_key.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


def exact_match_accuracy(model: nn.Module, data: JsonlDataset, batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy per task of greedy answers.

    For each record the prompt is ``input_ids`` up to its first scored position and the answer
    is its scored labels (labels != -100, in order; include the eos in the answer when it must
    be produced). The model decodes as many tokens greedily; the record is correct when they
    equal the answer. Returns ``{task: accuracy}`` in the data's task order.
    """
    prompts, answers = [], []
    for record in data.records:
        scored = (record["labels"] != IGNORE_INDEX).nonzero()
        prompts.append(record["input_ids"][: int(scored[0])].tolist())
        answers.append(record["labels"][record["labels"] != IGNORE_INDEX].tolist())
    correct = [False] * len(data)
    was_training = model.training
    model.eval()
    try:
        for batch in equal_key_batches([len(p) for p in prompts], batch_size):
            steps = max(len(answers[i]) for i in batch)
            ids = torch.tensor([prompts[i] for i in batch], device=model_device(model))
            prefilled = None
            if "pixel_values" in data.records[batch[0]]:  # Janus: images as pixels
                pixels = torch.stack([torch.load(data.records[i]["pixel_values"], weights_only=True) for i in batch])
                with torch.no_grad():
                    prefilled = with_pixels(model, {"input_ids": ids}, pixels, use_cache=True)
            decoded = continue_sequences(model, ids, steps, lambda logits: logits.argmax(dim=-1),
                                         prefilled=prefilled).tolist()
            for i, tokens in zip(batch, decoded):
                correct[i] = tokens[: len(answers[i])] == answers[i]
    finally:
        model.train(was_training)
    return {task: sum(c for c, t in zip(correct, data.tasks) if t == task) / data.tasks.count(task)
            for task in data.task_names()}
