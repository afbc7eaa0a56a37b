"""MoDESFTTrainer: ``mode.hf.MoDETrainer`` in front of TRL's ``SFTTrainer``, trained on the model's own loss.

    trainer = mode.hf.MoDESFTTrainer(model=peft_model, args=trl.SFTConfig(...), train_dataset=task_data,
                                     processing_class=tokenizer, gen_dataset=generation_stream, kd_lambda=0.3)

TRL 1.16's ``SFTTrainer.compute_loss`` takes the loss from its own fused head over the raw output-head
log-probabilities, which skips what the model's forward does to its logits (Chameleon's forward masks the
image codes, so the task loss would be another objective), and ``return_outputs=True`` makes it run a
second forward. Here the task loss is the model's forward with ``labels`` (``MoDETrainer.task_loss``: one
forward per task batch), and the metrics SFTTrainer logs, ``entropy`` and ``mean_token_accuracy`` over the
scored tokens and ``num_tokens``, are computed from that forward's logits. Everything else (dataset
preparation, collator, logging) is SFTTrainer's. Needs ``trl``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from ..constants import IGNORE_INDEX
from .trainer import MoDETrainer


class MoDESFTTrainer(MoDETrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with MoDE's KD term and adapter-only checkpoints (``mode.hf.MoDETrainer``), its
    loss and its logged metrics taken from the model's own forward."""

    def task_loss(self, model: nn.Module, inputs: dict[str, Any],
                  num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, Any]:
        inputs["use_cache"] = False  # as SFTTrainer: no KV cache in training (nor under gradient checkpointing)
        labels = inputs.get("labels")
        loss, outputs = super().task_loss(model, inputs, num_items_in_batch)
        if labels is not None:
            self._log_token_metrics(outputs.logits, labels, inputs)
        return loss, outputs

    @torch.no_grad()
    def _log_token_metrics(self, logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> None:
        # SFTTrainer's definitions (trl/trainer/sft_trainer.py, compute_loss): over the positions whose
        # next-token label is scored, the mean entropy of the next-token distribution and the share of
        # labels that are its most likely token; summed over processes before dividing.
        mode = "train" if self.model.training else "eval"
        labels = labels[:, 1:]
        scored = labels != IGNORE_INDEX
        logits = logits[:, :-1][scored].float()
        log_p = logits.log_softmax(-1)
        entropy = torch.special.entr(log_p.exp()).sum()  # 0 where p = 0 (masked logits)
        correct = (logits.argmax(-1) == labels[scored]).sum()
        gather = self.accelerator.gather_for_metrics
        count, entropy, correct = (gather(t.reshape(1)).sum() for t in (scored.sum(), entropy, correct))
        self._metrics[mode]["entropy"].append((entropy / count).item() if count > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += gather(inputs["attention_mask"].sum().reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
