"""``mode-prepare`` / ``python -m mode.workloads.hf_model.prepare``: raw images and text in, the
trainer's tokenized JSONL out, with the checkpoint's own processor and VQ encoder.

    mode-prepare --model /ckpt/anole-7b-hf raw/gqa.jsonl data/gqa.jsonl
    mode-prepare --model /ckpt/anole-7b-hf raw/captions.jsonl data/generation.jsonl --prompt-dir data/prompts

Input records, one JSON object a line, image paths relative to the file:
    task               {"image": "img/1.png", "question": "What color is it?", "answer": "red", "task"?: "gqa"}
                       -> {"input_ids": [...], "answer_start": N, "task"?: ...}: the processor's prompt
                       (``--template`` with the image placeholder and the question), then the answer's
                       tokens and the eos token, scored
    generation stream  {"caption": "a red square", "image": "img/2.png"}
                       -> {"input_ids": [...], "answer_start": N}: caption, then the image, scored from
                       its first code (the --gen-data stream MoDE distils on)
    prompt             {"caption": "a red square", "name"?: "square"} -> DIR/NAME.json for --gen-prompts
                       (``--prompt-dir``): Chameleon: the caption's ids; Emu3: the processor's
                       generation prompt and the image's height and width in latents

The processor writes placeholders (``<image>``) where the image goes; each batch's images are
encoded by the checkpoint's VQ encoder (``get_image_tokens``) and their codes replace the
placeholders: Chameleon / Anole 1024 codes between <racm3:break> and <eoss>; Emu3 its row
layout (each row's codes and an end-of-row token, see ``emu3``). A placeholder count that does not
match the codes is an error, and so are codes outside the family's image codes; the summary counts them
(``loading.check_image_tokens``, which mode-train runs with its --modality).

Bad records (bad JSON, missing or empty fields, a missing or unreadable image, one of the processor's image
tokens such as ``<image>`` typed in the text) are listed with
``file:line``; ``--on-bad-record refuse`` (default, as the trainer) writes nothing and exits 2,
``skip`` drops them with a warning. The output is written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ...families import FAMILIES, ModelFamily
from ...hf.models import hf_model, model_device
from ..help_format import HelpFormatter, docstring_text
from .data import REPORTED_ERRORS, parse_record
from .loading import check_image_tokens, load_model, modality_spec_for, own_spec, token_checks, vocab_size

if TYPE_CHECKING:
    from PIL import Image

# The processor's attributes naming its image tokens: the placeholder it expands and the markers around an image.
IMAGE_TOKENS = ("image_token", "image_start_token", "image_end_token")


@dataclass
class RawRecord:
    source: str  # file:line
    kind: str  # "task", "stream" or "prompt"
    fields: dict
    image: Path | None = None  # checked readable; decoded batch by batch (a data set's pixels need not fit in memory)

    def load_image(self) -> Image.Image:
        from PIL import Image

        try:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        except OSError as exc:  # passed verify() but does not decode (e.g. truncated)
            raise ValueError(f"{self.source}: image {self.fields['image']!r}: unreadable ({exc})") from None


def read_records(path: Path, reserved: tuple[str, ...] = ()) -> tuple[list[RawRecord], list[str]]:
    """The valid records of ``path`` (images opened) and the problems of the others, with file:line.
    ``reserved``: the processor's image tokens (``<image>``...), which a record's text must not hold: the
    processor would count a typed ``<image>`` as one more image."""
    from PIL import Image, UnidentifiedImageError

    records, errors = [], []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        source = f"{path}:{line_no}"
        try:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError("not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            if "question" in obj or "answer" in obj:
                kind, required = "task", ("image", "question", "answer")
            elif "image" in obj:
                kind, required = "stream", ("image", "caption")
            elif "caption" in obj:
                kind, required = "prompt", ("caption",)
            else:
                raise ValueError("expected a task {image, question, answer}, a generation-stream record "
                                 "{caption, image} or a prompt {caption}")
            for name in required + tuple(k for k in ("task", "name") if k in obj):
                if not isinstance(obj.get(name), str) or not obj[name].strip():
                    raise ValueError(f"{name}: " + ("missing" if name not in obj else "expected a non-empty string"))
            for name in ("question", "answer", "caption"):
                typed = next((token for token in reserved if token in obj.get(name, "")), None)
                if typed is not None:
                    raise ValueError(f"{name}: holds {typed!r}, one of the processor's image tokens: the record's "
                                     "image goes where --template puts {image}; remove it from the text")
            if kind == "prompt" and Path(obj.get("name", "x")).name != obj.get("name", "x"):
                raise ValueError(f"name {obj['name']!r}: expected a file name (it names PROMPT_DIR/NAME.json)")
            image_path = None
            if "image" in required:
                image_path = path.parent / obj["image"]
                if not image_path.is_file():
                    raise ValueError(f"image {obj['image']!r}: no such file ({image_path})")
                try:
                    with Image.open(image_path) as img:
                        img.verify()  # the header and checksums, without decoding the pixels
                except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                    raise ValueError(f"image {obj['image']!r}: unreadable ({exc})") from None
            records.append(RawRecord(source, kind, obj, image_path))
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    return records, errors


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model`` among ``mode.families.FAMILIES`` (mode-prepare needs its processor's ways)."""
    model_type = hf_model(model).config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"mode-prepare: model type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


class Preparer:
    """The checkpoint's processor and VQ encoder, turning raw records into token records."""

    def __init__(self, model: nn.Module, processor, template: str = "{image}{question}", ratio: str = "1:1",
                 image_area: int | None = None):
        self.model, self.processor, self.family = model, processor, family_of(model)
        self.tokenizer = processor.tokenizer
        self.placeholder = processor.image_token
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(self.placeholder)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("mode-prepare: the tokenizer has no eos token to end the answers with")
        if template.count("{image}") != 1 or "{question}" not in template:
            raise ValueError(f"--template {template!r}: expected one {{image}} and a {{question}}")
        self.template, self.ratio, self.image_area = template, ratio, image_area
        config = hf_model(model).config
        self.spec = modality_spec_for(self.family.name, vocab_size(model), getattr(config, "vocabulary_map", None),
                                      model=model)
        self.codes = self.spec.image_token_ranges[-1]
        self.text_options = self.family.processor_text_options()

    def _with_codes(self, texts: list[str], images: list) -> list[list[int]]:
        """The processor's ids of ``texts`` with ``images``, placeholders replaced by the VQ codes."""
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt", **self.text_options)
        pixels = batch["pixel_values"].to(model_device(self.model), next(self.model.parameters()).dtype)
        with torch.no_grad():
            codes = self.family.image_codes(self.model, pixels, batch)
        codes = codes.reshape(-1).cpu()
        rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        ids = torch.cat(rows)
        slots = ids == self.placeholder_id
        if int(slots.sum()) != codes.numel():
            raise ValueError(f"mode-prepare: the processor wrote {int(slots.sum())} image placeholders for "
                             f"{codes.numel()} VQ codes; its image_seq_length does not match the VQ encoder")
        ids[slots] = codes.to(ids.dtype)
        return [part.tolist() for part in ids.split([len(r) for r in rows])]

    def tokenize(self, records: list[RawRecord]) -> list[dict]:
        """One output object per record (records of one kind at a time)."""
        kind = records[0].kind
        if kind == "prompt":
            return [self._prompt(r) for r in records]
        own = self.family.tokenize_records(self.model, self.processor, self.template, records)
        if own is not None:
            return own
        if kind == "task":
            texts = [self.template.format(image=self.placeholder, question=r.fields["question"]) for r in records]
        else:
            texts = [r.fields["caption"] + self.placeholder for r in records]
        out = []
        for r, ids in zip(records, self._with_codes(texts, [r.load_image() for r in records])):
            if kind == "task":
                answer = self.tokenizer(r.fields["answer"], add_special_tokens=False)["input_ids"]
                obj = {"input_ids": ids + answer + [self.tokenizer.eos_token_id], "answer_start": len(ids)}
            else:  # scored from the image's first code on
                lo, hi = self.codes
                start = next((i for i, t in enumerate(ids) if lo <= t < hi), None)
                if start is None:
                    name = self.family.name
                    raise ValueError(f"{r.source}: none of the image's VQ codes lies in {name}'s image codes "
                                     f"{lo}..{hi - 1} (spec {self.spec}); is the checkpoint a {name} one?")
                obj = {"input_ids": ids, "answer_start": start}
            out.append({**obj, **({"task": r.fields["task"]} if "task" in r.fields else {})})
        return out

    def _prompt(self, record: RawRecord) -> dict:
        return self.family.generation_prompt(self.processor, record.fields["caption"], self.ratio, self.image_area)


def sidecar_dir(output: Path) -> str:
    """The folder, beside ``output``, of its records' pixel files."""
    return f"{output.stem}.pixels"


def _same_kind_batches(records: list[RawRecord], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``records`` in batches of one kind, in order within each kind."""
    for kind in ("task", "stream", "prompt"):
        indices = [i for i, r in enumerate(records) if r.kind == kind]
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


def prepare(model_dir: str | Path, inputs: Path, output: Path, prompt_dir: Path | None = None,
            batch_size: int = 8, on_error: str = "refuse", template: str = "{image}{question}",
            ratio: str = "1:1", image_area: int | None = None, device: str = "cpu",
            progress: bool = True) -> dict:
    """Tokenize the raw JSONL ``inputs`` into ``output`` (task and generation-stream records, in
    input order) and ``prompt_dir`` (prompt records); returns counts. ValueError listing the bad
    records under ``on_error="refuse"`` (nothing written)."""
    from transformers import AutoProcessor

    if on_error not in ("refuse", "skip"):
        raise ValueError(f"on_error: expected 'refuse' or 'skip', got {on_error!r}")
    if not inputs.is_file():
        raise FileNotFoundError(f"{inputs}: no such file")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such model directory")
    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model_dir}: no processor to load ({exc}); mode-prepare needs the checkpoint "
                         "saved with its processor") from None
    records, errors = read_records(inputs, tuple(
        token for token in (getattr(processor, name, None) for name in IMAGE_TOKENS) if isinstance(token, str)))
    if errors:
        listed = "\n  ".join(errors[:REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - REPORTED_ERRORS} more" if len(errors) > REPORTED_ERRORS else ""
        if on_error == "refuse":
            raise ValueError(f"{len(errors)} bad record(s) (use --on-bad-record skip to drop them):\n  {listed}{more}")
        warnings.warn(f"skipped {len(errors)} bad record(s), kept {len(records)}:\n  {listed}{more}", stacklevel=2)
    if not records:
        raise ValueError(f"{inputs}: no valid record")
    if any(r.kind == "prompt" for r in records) and prompt_dir is None:
        raise ValueError(f"{inputs}: prompt records ({{caption}} without an image) need --prompt-dir")
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    model = load_model(model_dir, dtype=dtype, device=device)
    preparer = Preparer(model, processor, template, ratio, image_area)
    results: list[dict | None] = [None] * len(records)
    with tqdm(total=len(records), desc=f"mode-prepare {inputs.name}", disable=not progress) as bar:
        for batch in _same_kind_batches(records, batch_size):
            for i, obj in zip(batch, preparer.tokenize([records[i] for i in batch])):
                results[i] = obj
            bar.update(len(batch))
    # what the trainer will refuse is refused now: ids outside the model's vocabulary (a processor
    # of another checkpoint), placeholders left, task labels on masked image codes
    checks = {task_labels: token_checks(model, preparer.spec, task_labels) for task_labels in (True, False)}
    max_length = getattr(hf_model(model).config, "max_position_embeddings", None)
    problems = []
    for r, obj in zip(records, results):
        if r.kind != "prompt":
            try:
                parse_record({k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}, vocab_size(model), "-",
                             max_length, checks[r.kind == "task"])
            except ValueError as exc:
                problems.append(f"{r.source}: the tokenized record: {exc}")
    tokenized = [torch.tensor(obj["input_ids"]) for r, obj in zip(records, results) if r.kind != "prompt"]
    image_codes = check_image_tokens(tokenized, preparer.spec, preparer.family.name, own_spec(model), str(inputs))
    if problems:
        raise ValueError(f"{len(problems)} tokenized record(s) the trainer would refuse (is --model the processor's "
                         "checkpoint?):\n  " + "\n  ".join(problems[:REPORTED_ERRORS]))
    pixel_files = [(n, obj, key) for n, obj in enumerate(results) for key, value in obj.items()
                   if isinstance(value, torch.Tensor)]
    if pixel_files:  # tensors in records (Janus: understanding images as pixels), each in a file beside the output
        (output.parent / sidecar_dir(output)).mkdir(parents=True, exist_ok=True)
    for n, obj, key in pixel_files:
        name = f"{sidecar_dir(output)}/{n}.pt"
        torch.save(obj[key].contiguous().clone(), output.parent / name)
        obj[key] = name
    lines = [json.dumps(obj) for r, obj in zip(records, results) if r.kind != "prompt"]
    if lines:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(output)
    prompts = [(r, obj) for r, obj in zip(records, results) if r.kind == "prompt"]
    for n, (r, obj) in enumerate(prompts):
        prompt_dir.mkdir(parents=True, exist_ok=True)
        (prompt_dir / f"{r.fields.get('name', f'prompt{n}')}.json").write_text(json.dumps(obj) + "\n")
    return {"records": len(lines), "prompts": len(prompts), "skipped": len(errors), "image_codes": image_codes,
            "tokens": sum(ids.numel() for ids in tokenized)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    usage, records = docstring_text(__doc__).split("\n\nInput records")
    parser = argparse.ArgumentParser(prog="mode-prepare", description=usage, epilog="Input records" + records,
                                     formatter_class=HelpFormatter)
    parser.add_argument("input", type=Path, help="raw JSONL (image paths relative to it)")
    parser.add_argument("output", type=Path, help="tokenized JSONL for mode-train --data / --gen-data")
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint with its processor")
    parser.add_argument("--prompt-dir", type=Path, help="where prompt records go, one NAME.json each")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VQ-encoder call")
    parser.add_argument("--on-bad-record", choices=("refuse", "skip"), default="refuse",
                        help="bad records (listed with file:line): refuse writes nothing and exits 2, skip drops "
                             "them with a warning")
    parser.add_argument("--template", default="{image}{question}",
                        help="a task's prompt text; {image}: the processor's image placeholder")
    parser.add_argument("--ratio", default="1:1", help="emu3 prompts: the image's aspect ratio W:H")
    parser.add_argument("--image-area", type=int, help="emu3 prompts: the image's area in pixels "
                        "(default: the processor's)")
    parser.add_argument("--device", default="cpu",
                        help="where the VQ encoder runs (cuda: the model in bfloat16, much faster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = prepare(args.model, args.input, args.output, args.prompt_dir, args.batch_size, args.on_bad_record,
                         args.template, args.ratio, args.image_area, args.device, not args.no_progress)
    except (OSError, ValueError) as err:
        print(f"mode-prepare: {err}", file=sys.stderr)
        return 2
    print(f"mode-prepare: {counts['records']} record(s) to {args.output} ({counts['image_codes']} of their "
          f"{counts['tokens']} tokens image codes), {counts['prompts']} prompt(s), {counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
