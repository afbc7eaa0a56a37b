"""MoDETrainer: ``transformers.Trainer`` with MoDE's distillation term and adapter-only checkpoints.

    trainer = mode.hf.MoDETrainer(model=peft_model, args=TrainingArguments(...), train_dataset=task_data,
                                  gen_dataset=generation_stream, kd_lambda=0.3, kd_temperature=2.0)
    trainer.train()

    trainer = mode.hf.MoDESFTTrainer(...)   # the same with TRL's SFTTrainer (mode.hf.sft)

Every training step's loss is the model's own loss on the task batch (its forward with ``labels``, as
``transformers.Trainer.compute_loss`` computes it: one forward; for Chameleon, over the logits its forward
masks) plus ``kd_lambda * mode.kd_loss`` on a batch of the generation stream (the frozen model, i.e. the
adapters switched off, as teacher: two decoder forwards). Checkpoints and ``save_model`` hold the adapters
only, in the format of ``mode.save_adapter`` (PEFT's); ``resume_from_checkpoint`` and
``load_best_model_at_end`` read them back.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..adapter_io import CONFIG_NAME, load_adapter, save_adapter
from ..families import family_of
from ..kd import kd_loss, kd_vocab_range
from ..kd_cache import ROW_IDS, TeacherCache
from ..layer import routed_layers

# The KD helper may take the teacher's top-k (MoDE's code keeps the top 256 image codes).
KD_TAKES_TOPK = "topk" in inspect.signature(kd_loss).parameters


class MoDETrainer(Trainer):
    """A ``transformers.Trainer`` for a MoDE model (``mode.apply_mode`` or a PEFT model of
    ``mode.MoDEPeftConfig``), usable as a mixin in front of another Trainer subclass (TRL's SFTTrainer).

    Args (besides the Trainer's, all given by keyword):
        gen_dataset: rows of the generation stream (caption + image codes), tokenized: ``input_ids``
            and optionally ``labels`` / ``attention_mask`` / ``modality_ids`` (see ``mode.kd_loss``
            for which positions are distilled). None: no KD term.
        gen_data_collator: batches ``gen_dataset`` rows; default the Trainer's ``data_collator``.
        kd_lambda: weight of the KD term (MoDE: 0.3).
        kd_temperature: KD temperature, applied once to both logits (MoDE: 2).
        kd_topk: keep only the teacher's k largest image-code logits (needs a ``mode.kd_loss`` that
            takes ``topk``); None: the whole image-code slice.
        kd_cache: a directory: the teacher's top k over ``gen_dataset`` is computed once (at the first KD
            step, the main process first) and stored there (``mode.kd_cache.TeacherCache``, keyed by the
            model's frozen weights and dtype, the rows, k, the temperature and the slice), then read instead
            of running the teacher's forward; the ``mode-train`` cache (--cache-dir/kd-teacher) works too.
            None (default): the teacher's forward on every generation batch.

    Generation batches have ``per_device_train_batch_size`` rows, drawn in an order seeded by
    ``args.seed`` and the process index, cycling over ``gen_dataset``; a resumed run continues the
    stream where the interrupted one was. The mean KD value since the
    last log is logged as ``kd_loss``.
    """

    def __init__(self, *args, gen_dataset=None, gen_data_collator=None, kd_lambda: float = 0.3,
                 kd_temperature: float = 2.0, kd_topk: int | None = None,
                 kd_cache: str | os.PathLike | None = None, **kwargs):
        if isinstance(kd_lambda, bool) or not isinstance(kd_lambda, (int, float)) or kd_lambda < 0:
            raise ValueError(f"kd_lambda: expected a number >= 0, got {kd_lambda!r}")
        if isinstance(kd_temperature, bool) or not isinstance(kd_temperature, (int, float)) or not kd_temperature > 0:
            raise ValueError(f"kd_temperature: expected a number > 0, got {kd_temperature!r}")
        if kd_topk is not None:
            if isinstance(kd_topk, bool) or not isinstance(kd_topk, int) or kd_topk < 1:
                raise ValueError(f"kd_topk: expected an int >= 1 or None, got {kd_topk!r}")
            if not KD_TAKES_TOPK:
                raise ValueError("kd_topk: this version of mode.kd_loss has no topk argument; pass kd_topk=None")
        if gen_dataset is not None and len(gen_dataset) == 0:
            raise ValueError("gen_dataset: empty")
        super().__init__(*args, **kwargs)
        if not routed_layers(self.model):
            raise ValueError(f"model: {type(self.model).__name__} has no MoDE layers; build it with mode.apply_mode "
                             "or peft.get_peft_model(model, mode.MoDEPeftConfig(...))")
        self.gen_dataset, self.gen_data_collator = gen_dataset, gen_data_collator
        self.kd_lambda, self.kd_temperature, self.kd_topk = float(kd_lambda), float(kd_temperature), kd_topk
        self.kd_cache_dir, self._teacher_cache = kd_cache, None
        self._masked_logit_ids: tuple[str, torch.Tensor | None] | None = None  # (family, ids), at the first step
        self._gen_batches: Iterator | None = None
        self._kd_values: list[torch.Tensor] = []

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = self.task_loss(model, inputs, num_items_in_batch)
        if model.training and self.gen_dataset is not None and self.kd_lambda > 0:
            kd = self.kd_term(model)
            self._kd_values.append(kd.detach())
            loss = loss + self.kd_lambda * kd * self._kd_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def task_loss(self, model: nn.Module, inputs: dict[str, Any],
                  num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, Any]:
        """The task batch's loss and the model's outputs from one forward: ``transformers.Trainer.compute_loss``
        named directly, so that a Trainer subclass behind this one in the MRO (TRL's SFTTrainer, whose loss
        skips the model's own logit processing) does not replace the model's loss."""
        self._check_labels(model, inputs.get("labels"))
        return Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _check_labels(self, model: nn.Module, labels: torch.Tensor | None) -> None:
        """A label on an id whose logit the model's own forward masks (Chameleon's image codes) makes the loss
        infinite, which Trainer's logging would show filtered (``logging_nan_inf_filter``): refused, naming the
        ids. One device check per step (a host sync); None where the family masks nothing."""
        if labels is None:
            return
        if self._masked_logit_ids is None:
            unwrapped = self.accelerator.unwrap_model(model)
            family = family_of(unwrapped)
            masked = family.masked_logit_ids(unwrapped) if family.image_logits_masked else None
            self._masked_logit_ids = (family.name, None if masked is None else masked.to(labels.device))
        name, masked = self._masked_logit_ids
        if masked is not None and bool(torch.isin(labels, masked).any()):
            bad = labels[torch.isin(labels, masked)].unique()[:5].tolist()
            raise ValueError(f"labels: ids {bad} are image codes, whose logits {name}'s forward masks to the lowest "
                             "float, so the loss would be infinite; give them label -100 (image codes are trained "
                             "through the generation stream's KD term, mode.kd_loss)")

    def kd_term(self, model: nn.Module) -> torch.Tensor:
        """``mode.kd_loss`` of ``model`` on the next generation-stream batch."""
        batch = self._prepare_inputs(self._next_gen_batch())
        unwrapped = self.accelerator.unwrap_model(model)
        if self.kd_cache_dir is not None:
            teacher = self._kd_teacher_cache(unwrapped).lookup(batch)
            return kd_loss(unwrapped, batch, temperature=self.kd_temperature, teacher=teacher)
        topk = {"topk": self.kd_topk} if self.kd_topk is not None else {}
        return kd_loss(unwrapped, batch, temperature=self.kd_temperature, **topk)

    def _kd_teacher_cache(self, model: nn.Module) -> TeacherCache:
        if self._teacher_cache is None:
            lo, hi = kd_vocab_range(model)
            with self.args.main_process_first(desc="KD teacher cache"):
                self._teacher_cache = TeacherCache.load_or_build(
                    self.kd_cache_dir, model, self.gen_dataset, self.gen_data_collator or self.data_collator,
                    k=self.kd_topk or hi - lo, temperature=self.kd_temperature, vocab_range=(lo, hi),
                    batch_size=self.args.per_device_train_batch_size, device=self.args.device,
                    progress=not self.args.disable_tqdm)
            cache = self._teacher_cache
            if self.is_world_process_zero():
                print(f"MoDETrainer: KD teacher cache {cache.path} ({cache.nbytes / 2**20:.1f} MiB on disk, "
                      f"{'computed' if cache.computed else 'reused'})", flush=True)
        return self._teacher_cache

    def _kd_scale(self, num_items_in_batch) -> float:
        # Trainer.training_step divides the loss by the accumulation steps unless the task loss was
        # already normalised over the whole accumulated batch; the KD mean then needs it here.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                     self.compute_loss_func is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return 1.0 / steps if scaled else 1.0

    def _next_gen_batch(self) -> dict:
        if self._gen_batches is None:
            self._gen_batches = self._cycle_gen_batches()
        return next(self._gen_batches)

    def _cycle_gen_batches(self) -> Iterator[dict]:
        # Reshuffled each pass; a resumed run skips the batches its steps so far drew (one per
        # micro-batch), so that it continues the stream where the interrupted run was.
        generator = torch.Generator().manual_seed(self.args.seed + self.args.process_index)
        collate = self.gen_data_collator or self.data_collator
        size, rows = len(self.gen_dataset), self.args.per_device_train_batch_size
        skip = self.state.global_step * self.args.gradient_accumulation_steps
        while True:
            order = torch.randperm(size, generator=generator).tolist()
            for start in range(0, size, rows):
                if skip:
                    skip -= 1
                    continue
                batch = collate([self.gen_dataset[i] for i in order[start:start + rows]])
                if self.kd_cache_dir is not None:  # each row's index in gen_dataset, for the teacher cache
                    batch = {**batch, ROW_IDS: torch.tensor(order[start:start + rows])}
                yield batch

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._kd_values and "loss" in logs:  # a training log: the KD mean since the last one
            logs["kd_loss"] = torch.stack(self._kd_values).mean().item()
            self._kd_values.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ adapter-only checkpoints

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import PeftModel

        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(unwrapped, PeftModel):  # the Trainer reads PEFT adapters itself
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        if not os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_NAME)):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {CONFIG_NAME} (MoDETrainer "
                             "checkpoints hold the adapters only)")
        load_adapter(unwrapped, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # load_best_model_at_end: the Trainer reads a PEFT model's adapters itself, but for any other
        # model it looks for the full weights, which MoDETrainer's checkpoints do not hold.
        from peft import PeftModel

        if isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            super()._load_best_model()
            return
        self._load_from_checkpoint(self.state.best_model_checkpoint)
