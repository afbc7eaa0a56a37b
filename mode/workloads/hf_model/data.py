"""Pre-tokenized training data from JSON Lines files (``--data`` tasks, ``--gen-data`` distillation stream).

One JSON object per line, token ids already produced by the model's tokenizer:

    {"task": "scienceqa", "input_ids": [0, 8197, 4, 917, 8196, 3923, 1160, 23], "answer_start": 6}
    {"task": "scienceqa", "input_ids": [0, 8197, 4, 917, 8196, 3923, 1160, 23],
     "labels": [-100, -100, -100, -100, -100, -100, 1160, 23]}

Fields:
    input_ids     list of ints in [0, vocab_size): the whole sequence, prompt and answer.
    labels        list of ints, same length as input_ids, aligned with them as Hugging Face causal
                  LMs take labels (the model shifts them): the token to score at each position, or
                  -100 where nothing is scored. At least one position must be scored, and not
                  position 0 (nothing precedes it).
    answer_start  int in [1, len(input_ids)): instead of labels; the tokens from there on are the
                  answer (scored), the ones before are the prompt (not scored).
    pixel_values  optional string (Janus): a file, relative to the JSONL, holding the pixel values
                  [3, S, S] (``torch.save``) of the image whose placeholders input_ids hold; read
                  batch by batch (``collate``).
    task          optional string: the task the record belongs to, so that one file can hold
                  several tasks; records without it belong to the task named after the file (its
                  stem: ``gqa.jsonl`` -> "gqa"). Tasks keep the order of their first record.
Exactly one of ``labels`` and ``answer_start``. Other fields (ids, raw text...) are ignored.

For a generation stream (``--gen-data``) a record is a caption followed by the image codes, with
the image part scored: e.g. ``answer_start`` at the begin-of-image marker's successor.

Bad records (bad JSON, bytes that are not UTF-8, empty lines, missing or ill-typed fields, ids outside the vocabulary,
labels of another length, answer_start out of range, nothing scored, too long, and with ``TokenChecks``
the two mistakes that pass silently otherwise: image placeholder ids left inside an image span,
task labels on image codes whose logits the model masks) are reported with
``file:line`` and the reason (records mode-prepare has not tokenized yet with a hint to run it);
``on_error="refuse"`` (the trainer's ``--on-bad-record refuse``) raises a ValueError listing them,
``on_error="skip"`` drops them with a warning giving their count and the first reasons. Never silent.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...constants import IGNORE_INDEX
from ...modality import IMAGE, ModalitySpec

REPORTED_ERRORS = 10  # bad records listed in a message; the rest are counted
RAW_FIELDS = ("image", "question", "answer", "caption")  # mode-prepare's input records, not yet tokenized


@dataclass
class JsonlDataset:
    """Validated records: ``records[i]`` is ``{"input_ids": LongTensor [T], "labels": LongTensor [T]}``,
    ``tasks[i]`` its task name and ``sources[i]`` its ``file:line``."""

    records: list[dict[str, Tensor]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.records[index]

    def task_names(self) -> list[str]:
        """Task names in the order of their first record."""
        return list(dict.fromkeys(self.tasks))

    def task(self, name: str) -> JsonlDataset:
        """The records of one task."""
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; the data has {self.task_names()}")
        keep = [i for i, t in enumerate(self.tasks) if t == name]
        return JsonlDataset([self.records[i] for i in keep], [name] * len(keep), [self.sources[i] for i in keep])


@dataclass(frozen=True)
class TokenChecks:
    """What the model says about its image tokens, for the checks only a model can inform.

    ``spec``: the image tokens; ``placeholder_id``: the processor's image placeholder (Chameleon's
    and Emu3's ``<image>``, ``config.image_token_id``), which the VQ codes must replace: left in an
    image span it is embedded and routed as an image token although it is no image; left in the
    text, it stands for an image that was never expanded into a span, and the model sees a
    placeholder's embedding where the prompt meant an image;
    ``image_logits_masked``: the model's forward sets the logits of the image codes to the lowest
    float (Chameleon / Anole), so a task label on an image code has an infinite loss. Not for the
    generation stream, which scores image codes on purpose (KD, image NLL) outside that forward.
    """

    spec: ModalitySpec
    placeholder_id: int | None = None
    image_logits_masked: bool = False

    def check(self, input_ids: list[int], labels: list[int]) -> None:
        """ValueError with the first offending position and the reason."""
        ids = torch.tensor(input_ids)
        if self.placeholder_id is not None:
            placeholder = ids == self.placeholder_id
            if placeholder.any():
                i = int(placeholder.nonzero()[0])
                where = ("inside an image span", "the image's VQ codes were not spliced in") \
                    if self.spec.modality_ids(ids)[i] == IMAGE else \
                    ("in the text", "an image the processor never expanded into a span of codes")
                raise ValueError(f"input_ids[{i}] = {self.placeholder_id} is the processor's image placeholder, "
                                 f"{where[0]} ({int(placeholder.sum())} such ids): {where[1]} (mode-prepare "
                                 "expands and splices images with the checkpoint's processor and VQ encoder)")
        if self.image_logits_masked:
            codes = torch.tensor(labels)
            on_code = torch.zeros_like(codes, dtype=torch.bool)
            for lo, hi in self.spec.image_token_ranges:
                on_code |= (codes >= lo) & (codes < hi)
            if on_code.any():
                i = int(on_code.nonzero()[0])
                raise ValueError(f"labels[{i}] = {labels[i]} scores an image code: this model's forward masks the "
                                 "logits of image codes (sets them to the lowest float), so the loss would be "
                                 "infinite; score the answer's text tokens only")


def _int_list(value, name: str) -> list[int]:
    # bool is an int in Python; a true/false inside a token list is a data bug.
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name}: expected a list of ints")
    return value


def parse_record(obj: object, vocab_size: int, default_task: str, max_length: int | None = None,
                 checks: TokenChecks | None = None) -> tuple[dict[str, Tensor], str]:
    """One decoded JSON value -> (record tensors, task name); ValueError with the reason if bad."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "input_ids" not in obj:
        raw = [name for name in RAW_FIELDS if name in obj]
        raise ValueError("missing field 'input_ids'" + (
            f": a raw record ({', '.join(raw)}); tokenize the file with mode-prepare first "
            "(mode-prepare --model DIR RAW.jsonl OUT.jsonl)" if raw else ""))
    input_ids = _int_list(obj["input_ids"], "input_ids")
    if not input_ids:
        raise ValueError("input_ids: empty")
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(f"input_ids: {len(input_ids)} tokens, longer than the maximum {max_length}")
    bad = next((i for i, v in enumerate(input_ids) if not 0 <= v < vocab_size), None)
    if bad is not None:
        raise ValueError(f"input_ids[{bad}] = {input_ids[bad]} is outside the vocabulary [0, {vocab_size})")

    has_labels, has_start = "labels" in obj, "answer_start" in obj
    if has_labels == has_start:
        raise ValueError("expected exactly one of 'labels' and 'answer_start', got "
                         + ("both" if has_labels else "neither"))
    if has_labels:
        labels = _int_list(obj["labels"], "labels")
        if len(labels) != len(input_ids):
            raise ValueError(f"labels: {len(labels)} entries for {len(input_ids)} input_ids")
        bad = next((i for i, v in enumerate(labels) if v != IGNORE_INDEX and not 0 <= v < vocab_size), None)
        if bad is not None:
            raise ValueError(f"labels[{bad}] = {labels[bad]} is neither {IGNORE_INDEX} nor in the vocabulary "
                             f"[0, {vocab_size})")
        if all(v == IGNORE_INDEX for v in labels):
            raise ValueError(f"labels: every position is {IGNORE_INDEX}, nothing is scored")
        if labels[0] != IGNORE_INDEX:
            raise ValueError(f"labels[0] must be {IGNORE_INDEX}: the first token has no earlier token to be "
                             "predicted from (the prompt needs at least one token)")
    else:
        start = obj["answer_start"]
        if not isinstance(start, int) or isinstance(start, bool):
            raise ValueError(f"answer_start: expected an int, got {start!r}")
        if not 1 <= start < len(input_ids):
            raise ValueError(f"answer_start = {start} is out of range [1, {len(input_ids)}) "
                             "(the prompt and the answer need a token each)")
        labels = [IGNORE_INDEX] * start + input_ids[start:]
    if checks is not None:
        checks.check(input_ids, labels)

    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task:
        raise ValueError(f"task: expected a non-empty string, got {task!r}")
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}, task


def load_jsonl(paths: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
               on_error: str = "refuse", max_length: int | None = None,
               checks: TokenChecks | None = None) -> JsonlDataset:
    """Read and validate one or more JSON Lines files (in order) into a ``JsonlDataset``.

    ``vocab_size``: the model's vocabulary (ids must lie in [0, vocab_size)); ``max_length``:
    the longest sequence accepted (e.g. the model's maximum position), None for any; ``checks``:
    the model's image placeholder and masked image logits (``TokenChecks``), None for none.
    ``on_error``: "refuse" (raise ValueError listing the bad records) or "skip" (drop them with
    a warning). A file with no valid record is an error either way.
    """
    if on_error not in ("skip", "refuse"):
        raise ValueError(f"on_error: expected 'skip' or 'refuse', got {on_error!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    data, errors = JsonlDataset(), []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        valid_before, file_errors = len(data), []
        with open(path, "rb") as f:  # decoded per line, so that bad bytes are reported with their line
            for line_no, raw in enumerate(f, start=1):
                source = f"{path}:{line_no}"
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ValueError("not UTF-8 text") from None
                    if not line.strip():
                        raise ValueError("empty line")
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
                    record, task = parse_record(obj, vocab_size, path.stem, max_length, checks)
                    if isinstance(obj, dict) and "pixel_values" in obj:
                        record["pixel_values"] = _pixel_file(obj["pixel_values"], path)
                except ValueError as exc:
                    file_errors.append(f"{source}: {exc}")
                    continue
                data.records.append(record)
                data.tasks.append(task)
                data.sources.append(source)
        if len(data) == valid_before and not file_errors:
            raise ValueError(f"{path}: the file holds no record")
        if len(data) == valid_before and on_error == "skip":
            raise ValueError(f"{path}: no valid record; the first problems:\n  "
                             + "\n  ".join(file_errors[:REPORTED_ERRORS]))
        errors += file_errors
    if errors:
        listed = "\n  ".join(errors[:REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - REPORTED_ERRORS} more" if len(errors) > REPORTED_ERRORS else ""
        if on_error == "refuse":
            raise ValueError(f"{len(errors)} bad record(s) in the data (--on-bad-record skip drops them):\n  "
                             f"{listed}{more}")
        warnings.warn(f"skipped {len(errors)} bad record(s) of the data, kept {len(data)}:\n  {listed}{more}",
                      stacklevel=2)
    return data


def _pixel_file(value: object, jsonl: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"pixel_values: expected a file name relative to the JSONL, got {value!r}")
    file = jsonl.parent / value
    if not file.is_file():
        raise ValueError(f"pixel_values: no such file {file}")
    return file


def collate(records: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: ``input_ids`` (pad_id on padding), ``attention_mask`` (1 real, 0 pad)
    and ``labels`` (-100 on padding), each [B, longest record]; with records that name pixel files,
    also their ``pixel_values`` [B, 3, S, S]."""
    if not records:
        raise ValueError("collate: no records")
    length = max(len(r["input_ids"]) for r in records)
    input_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    labels = torch.full((len(records), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(records), length), dtype=torch.long)
    for row, r in enumerate(records):
        n = len(r["input_ids"])
        input_ids[row, :n] = r["input_ids"]
        labels[row, :n] = r["labels"]
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_pixels = sum("pixel_values" in r for r in records)
    if with_pixels and with_pixels != len(records):
        raise ValueError("collate: some records have pixel_values and some not; a batch holds one kind")
    if with_pixels:
        batch["pixel_values"] = torch.stack([torch.load(r["pixel_values"], weights_only=True) for r in records])
    return batch
