"""A local Hugging Face model directory (--model) with pre-tokenized JSONL tasks (--data) as a trainer workload."""
from __future__ import annotations

import importlib
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...families import FAMILIES, SharedVocabulary, family_of
from ...hf.models import decoder_of
from ...modality import IMAGE
from ...model import routing_state
from ..protocol import Environment, RunSettings, WorkloadError, to_device
from ..scoring import answer_nll, scored, target_logits
from . import evaluation, generation, loading
from .data import JsonlDataset, collate, load_jsonl
from .options import HFModelOptions


def load_decoder(target: str) -> Callable[..., Any]:
    """The function named by ``--decoder module:function`` (imported now, so that a typo fails
    before training)."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--decoder {target!r}: expected module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--decoder {target!r}: {err}") from None
    if not callable(function):
        raise ValueError(f"--decoder {target!r}: not callable")
    return function


class HFModelWorkload:
    """A local Hugging Face model directory (--model) and pre-tokenized JSONL tasks (--data)."""

    def __init__(self, options: HFModelOptions, settings: RunSettings, environment: Environment):
        self.options, self.settings, self.device, self.name = options, settings, environment.device, options.model
        try:
            # loaded once here and handed to the first method, which would otherwise load it again
            self._base_for_next_method = self._load()
            vocab = self.vocab_size = loading.vocab_size(self._base_for_next_method)
            self.spec = loading.modality_spec_for(options.modality, vocab,
                                                  getattr(self._base_for_next_method.config, "vocabulary_map", None),
                                                  model=self._base_for_next_method)
            # the --modality preset's family lays out the images drawn (a spec string: the shared layout)
            self.family = FAMILIES.get(options.modality.lower(), SharedVocabulary())
            self.decode_fn = load_decoder(options.decoder) if options.decoder else None
            max_length = getattr(self._base_for_next_method.config, "max_position_embeddings", None)

            def read(files: str, task_labels: bool = True) -> JsonlDataset:
                checks = loading.token_checks(self._base_for_next_method, self.spec, task_labels)
                return load_jsonl(files.split(","), vocab, on_error=options.on_bad_record, max_length=max_length,
                                  checks=checks)

            with warnings.catch_warnings():
                if not environment.is_main():
                    warnings.simplefilter("ignore")  # the skipped-records and spec reports once, from rank 0
                tasks = read(options.data)
                evals = read(options.eval_data) if options.eval_data else tasks
                self.generation_rows = read(options.gen_data, task_labels=False).records if options.gen_data else None
                loading.check_image_tokens(
                    [r["input_ids"] for r in tasks.records + (self.generation_rows or [])], self.spec,
                    options.modality, loading.own_spec(self._base_for_next_method),
                    "--data" + (" and --gen-data" if options.gen_data else ""))
            for path in options.gen_prompts:  # bad prompt files fail now, not after training
                self.family.image_prompt(self._base_for_next_method, path, generation.load_prompt(path, vocab),
                                         self.spec)
        except (OSError, ValueError) as err:
            raise WorkloadError(str(err)) from err
        self.kd_vocab_range = None  # KD on the spec's image ids
        self.is_main = environment.is_main
        self.pad_id = getattr(self._base_for_next_method.config, "pad_token_id", None) or 0
        self.task_names = tasks.task_names()
        self.tasks = [tasks.task(name).records for name in self.task_names]
        self.evals = self._held_out(evals)

    def _held_out(self, evals: JsonlDataset) -> JsonlDataset:
        """The first eval_size held-out records of each training task."""
        held_out = {name: [i for i, task in enumerate(evals.tasks) if task == name][: self.settings.eval_size]
                    for name in self.task_names}
        missing = [name for name, rows in held_out.items() if not rows]
        if missing:
            raise WorkloadError(f"--eval-data has no record of the task(s) {missing} (its tasks: "
                                f"{evals.task_names()}); a record's task is its \"task\" field, else its file's name: "
                                "name held-out files like the task files (test/gqa.jsonl for gqa.jsonl)")
        keep = [i for rows in held_out.values() for i in rows]
        return JsonlDataset([evals.records[i] for i in keep], [evals.tasks[i] for i in keep],
                            [evals.sources[i] for i in keep])

    def _load(self) -> nn.Module:
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        return loading.load_model(self.options.model, dtype=dtype, device=self.device)

    def task_rows(self, index: int) -> list:
        return self.tasks[index]

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)

    def pretrained_model(self) -> nn.Module:
        if self._base_for_next_method is not None:
            model, self._base_for_next_method = self._base_for_next_method, None
            return model
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._load()  # whatever loading draws leaves the adapters' init as it is

    @torch.no_grad()
    def image_nll(self, model: nn.Module) -> float | None:
        """Mean NLL per scored image token of the first eval_size generation-stream records."""
        if self.generation_rows is None:
            return None
        rows = self.generation_rows[: self.settings.eval_size]
        size = self.settings.batch_size
        family = family_of(model)
        head = family.image_head(model)
        total, count = 0.0, 0
        for start in range(0, len(rows), size):
            batch = to_device(self.collate(rows[start:start + size]), self.device)
            targeted = (self.spec.modality_ids(batch["input_ids"]) == IMAGE) & scored(batch)
            if family.separate_image_stream:  # codes embedded and scored by the family's own embeddings and head
                selected = targeted[:, 1:]
                inputs = family.stream_inputs(model, batch["input_ids"], batch["attention_mask"],
                                              routing_state(model).config.modality.modality_ids(batch["input_ids"]))
                hidden = decoder_of(model)(**inputs, use_cache=False)[0][:, :-1][selected]
                logits = head.logits(hidden).float()
                targets = batch["input_ids"][:, 1:][selected] - head.first_id
            else:
                logits, targets = target_logits(model, batch, targeted)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
        if not count:
            raise WorkloadError(f"--gen-data: its first {len(rows)} records score no image token of --modality "
                                f"{self.options.modality}")
        return total / count

    def evaluate(self, model: nn.Module) -> dict:
        """Exact match and teacher-forced answer NLL per task on the held-out records, and image_nll
        (gen_acc is digits' only)."""
        size = self.settings.batch_size
        accs = evaluation.exact_match_accuracy(model, self.evals, batch_size=size)
        held_out = [[r for r, t in zip(self.evals.records, self.evals.tasks) if t == name] for name in self.task_names]
        # on the logits the model trains on (Chameleon's forward masks the image codes): the training loss's scale
        masked = loading.masked_logit_ids(model)
        nlls = [answer_nll(model, (to_device(self.collate(rows[i:i + size]), self.device)
                                   for i in range(0, len(rows), size)), masked) for rows in held_out]
        return {"accs": [accs[name] for name in self.task_names], "answer_nlls": nlls, "gen_acc": None,
                "image_nll": self.image_nll(model)}

    def evaluate_pretrained(self, model: nn.Module) -> dict:
        return {"gen_acc": None, "image_nll": self.image_nll(model)}

    def summary(self, pretrained: dict) -> str:
        nll = pretrained["image_nll"]
        return "Pretrained model: " + ("no --gen-data." if nll is None else f"image NLL {nll:.4f} nats/code.")

    def finish(self, model: nn.Module, method_name: str, output: Path) -> dict:
        if not self.options.gen_prompts:
            return {}
        with tempfile.TemporaryDirectory() as scratch:
            # every process draws (FSDP2 forwards are collectives); rank 0 keeps the files
            out_dir = output / "images" / method_name if self.is_main() else Path(scratch)
            own = self.family.generate_images(model, self.options.gen_prompts, out_dir,
                                              self.settings.gen_temperature, self.settings.seed)
            if own is not None:
                return {"images": own}
            images = generation.generate_images(model, self.options.gen_prompts, out_dir, self.spec,
                                                image_tokens=self.options.image_tokens,
                                                temperature=self.settings.gen_temperature, seed=self.settings.seed,
                                                batch_size=self.settings.batch_size, decode_fn=self.decode_fn,
                                                family=self.family, model_dir=self.options.model)
        return {"images": images}
