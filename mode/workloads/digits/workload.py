"""The digits benchmark as a trainer workload: the cached pretrained model and four continual tasks."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...modality import ModalitySpec
from ..protocol import Environment, RunSettings
from . import data as digits
from . import evaluation, generation
from . import model as digits_model
from .options import DigitsOptions


class DigitsWorkload:
    """The digits benchmark: the pretrained digits model (cached) and the continual digit tasks."""

    name = "digits"

    def __init__(self, options: DigitsOptions, settings: RunSettings, environment: Environment):
        def load() -> digits_model.Pretrained:
            pretrain_config = replace(digits_model.PretrainConfig(), steps=options.pretrain_steps,
                                      seed=options.pretrain_seed, questions=options.pretrain_questions)
            return digits_model.load_or_pretrain(pretrain_config=pretrain_config, cache_dir=environment.cache_dir,
                                                 progress=environment.progress)

        # Rank 0 pretrains (or reads the cache) first; the others then read its cache file
        # instead of pretraining too and racing on it.
        if environment.is_main():
            self.pretrained = load()
        environment.barrier()
        if not environment.is_main():
            self.pretrained = load()
        self.options, self.settings = options, settings
        self.progress = environment.progress
        vocab, data = self.pretrained.vocab, self.pretrained.data
        self.base_state = {k: v.clone() for k, v in self.pretrained.model.state_dict().items()}
        self.tasks = digits.TASK_DESIGNS[options.digits_tasks]
        self.task_names = [task.name for task in self.tasks]
        self.spec = ModalitySpec(**vocab.modality_spec_args())
        self.vocab_size = len(vocab)
        self.kd_vocab_range = vocab.image_code_range
        self.generation_rows = digits.generation_examples(vocab, data.train_images, data.train_labels)
        self.classifier = generation.fit_digit_classifier(data)
        # evaluation runs after every task: the first eval_size test images only
        self.test = replace(data, test_images=data.test_images[: settings.eval_size],
                            test_labels=data.test_labels[: settings.eval_size])

    def task_rows(self, index: int) -> list[digits.Example]:
        data = self.pretrained.data
        return digits.task_examples(self.pretrained.vocab, self.tasks[index], data.train_images,
                                    data.train_labels)

    def collate(self, rows: list[digits.Example]) -> dict[str, torch.Tensor]:
        return digits.collate(rows, self.pretrained.vocab.pad)

    def pretrained_model(self) -> nn.Module:
        """A fresh copy of the pretrained digits model, on the CPU (its random init draws the same each time)."""
        model = digits_model.build_model(self.pretrained.vocab, self.pretrained.model_config)
        model.load_state_dict(self.base_state)
        return model

    def _scores(self, model: nn.Module, task: digits.Task) -> dict[str, float]:
        return evaluation.task_scores(model, self.pretrained.vocab, task, self.test.test_images,
                                        self.test.test_labels, progress=self.progress)

    def _generation(self, model: nn.Module) -> dict:
        config = generation.GenerationConfig(self.options.gen_samples, self.settings.gen_temperature,
                                             self.settings.seed)
        return generation.evaluate_generation(model, self.pretrained.vocab, self.test, self.classifier, config,
                                              self.progress)

    def _samples(self, model: nn.Module) -> list:
        """One "draw a d" per digit, for the plot."""
        return generation.sample_images(model, self.pretrained.vocab, np.arange(10), self.settings.gen_temperature,
                                        self.settings.seed).tolist()

    def evaluate(self, model: nn.Module) -> dict:
        """Exact match, digit named right and answer NLL on every continual task, and generation
        quality, on the first eval_size test images."""
        scores = [self._scores(model, task) for task in self.tasks]
        return {"accs": [s["acc"] for s in scores], "digit_accs": [s["digit_acc"] for s in scores],
                "answer_nlls": [s["answer_nll"] for s in scores], **self._generation(model)}

    def evaluate_pretrained(self, model: nn.Module) -> dict:
        return {**self._generation(model), "digit_acc": self._scores(model, digits.DIGIT)["acc"],
                "classifier_acc": self.classifier.test_accuracy, "samples": self._samples(model)}

    def summary(self, pretrained: dict) -> str:
        return (f"Pretrained model: gen_acc {pretrained['gen_acc']:.3f}, image NLL {pretrained['image_nll']:.4f} "
                f"nats/code; understanding (digit) acc {pretrained['digit_acc']:.3f}; judge classifier test acc "
                f"{pretrained['classifier_acc']:.3f}.")

    def finish(self, model: nn.Module, method_name: str, output: Path) -> dict:
        return {"samples": self._samples(model)}
