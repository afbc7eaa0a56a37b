"""A third workload written against the workload protocol only (``mode.workloads``; nothing of
``mode.train``): two tiny tasks on a one-layer random Llama. ``test_third_workload.py`` registers it under
the entry-point group ``mode.workloads`` as ``minimal`` and trains it with ``--benchmark minimal``.

Vocabulary (16 ids): 0 pad, 1 eos, 2 and 3 the two tasks' questions, 4 "draw", 6..9 answers, 10..13 image codes.
Task t asks about image code 10 + x; its answer is 6 + (x + t) % 4, then eos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mode import ModalitySpec
from mode.constants import IGNORE_INDEX
from mode.workloads import Environment, RunSettings, WorkloadFactory
from mode.workloads.scoring import answer_nll

VOCAB, PAD, EOS, DRAW = 16, 0, 1, 4


@dataclass
class MinimalOptions:
    minimal_rows: int = field(default=32, metadata={"help": "minimal: training rows per task"})


class MinimalWorkload:
    name = "minimal"
    task_names = ["first", "second"]
    spec = ModalitySpec(image_token_ranges=((10, 14),))
    vocab_size = VOCAB
    kd_vocab_range = None

    def __init__(self, options: MinimalOptions, settings: RunSettings, environment: Environment):
        self.options, self.settings = options, settings
        self.generation_rows = [([DRAW, 6 + x], [10 + x, EOS]) for x in range(4)]

    def task_rows(self, index: int) -> list[tuple[list[int], list[int]]]:
        return [([10 + x % 4, 2 + index], [6 + (x + index) % 4, EOS]) for x in range(self.options.minimal_rows)]

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([prompt + answer for prompt, answer in rows])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer for prompt, answer in rows])
        return {"input_ids": ids, "labels": labels}

    def pretrained_model(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng():  # the same weights every time; the trainer's generator left as it was
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=8))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        accs, nlls = [], []
        for index in range(len(self.task_names)):
            batch = self.collate(self.task_rows(index)[: self.settings.eval_size])
            predicted = model(input_ids=batch["input_ids"]).logits[:, 1:-1].argmax(-1)
            accs.append((predicted == batch["labels"][:, 2:]).all(-1).float().mean().item())
            nlls.append(answer_nll(model, [batch]))
        return {"accs": accs, "answer_nlls": nlls, "gen_acc": None, "image_nll": None}

    def evaluate_pretrained(self, model: nn.Module) -> dict:
        return {"gen_acc": None, "image_nll": None}

    def summary(self, pretrained: dict) -> str:
        return "A random one-layer model."

    def finish(self, model: nn.Module, method_name: str, output: Path) -> dict:
        return {}


WORKLOAD = WorkloadFactory(MinimalOptions, MinimalWorkload, default_lr=1e-2)
