"""Generation on the digits benchmark and its judge.

- `sample_images`: images drawn from "draw a <digit>", with sampling restricted to the
  image codes for the 64 pixels (logits outside the code range are masked), so every
  sample decodes to an image.
- `evaluate_generation`: gen_acc (share of sampled images that a classifier fitted on the
  real training digits, `DigitClassifier`, assigns to the prompted digit) and image_nll (mean NLL of
  the test images under their generation prompt, nats per image code, full-vocabulary softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...hf.models import continue_sequences, model_device
from . import data as digits
from .data import DigitsData, DigitsVocab
from .evaluation import batch_slices


@torch.no_grad()
def sample_images(model: nn.Module, vocab: DigitsVocab, digit_labels: np.ndarray, temperature: float = 1.0,
                  seed: int = 0, batch_size: int = 512) -> np.ndarray:
    """Draw one image per entry of `digit_labels` from "draw a <digit>" -> int64 [N, 8, 8].

    Each of the 64 pixel tokens is sampled from the softmax over the image codes only
    (logits of every other token are masked), so every sample decodes to a valid image.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    lo, hi = vocab.image_code_range
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw_code(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[:, lo:hi] / temperature, dim=-1)
        return lo + torch.multinomial(probs, 1, generator=generator)[:, 0]

    images = []
    for rows in batch_slices(len(digit_labels), batch_size):
        prompts = torch.tensor([digits.generation_prompt(vocab, int(d)) for d in digit_labels[rows]])
        codes = continue_sequences(model, prompts, digits.IMAGE_PIXELS, draw_code)
        images.append((codes - lo).view(-1, digits.IMAGE_SIDE, digits.IMAGE_SIDE).cpu())
    model.train(was_training)
    return torch.cat(images).numpy()


@torch.no_grad()
def image_nll(model: nn.Module, vocab: DigitsVocab, images: np.ndarray, labels: np.ndarray,
              batch_size: int = 512) -> float:
    """Mean NLL (nats per image code, softmax over the full vocabulary) of the 64 codes of each
    image given "draw a <its digit>"."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    prompt_len = len(digits.generation_prompt(vocab, 0))
    total, count = 0.0, 0
    for rows in batch_slices(len(images), batch_size):
        ids = torch.tensor([digits.generation_prompt(vocab, int(y)) + vocab.image_to_codes(x)
                            for x, y in zip(images[rows], labels[rows])], device=device)
        logits = model(input_ids=ids).logits[:, prompt_len - 1:-1].float()  # the positions predicting the codes
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, prompt_len:].flatten(), reduction="sum")
        total += nll.item()
        count += ids[:, prompt_len:].numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------- generation quality

@dataclass
class DigitClassifier:
    """An RBF SVC on the 64 pixel values of the real training digits: the judge of gen_acc."""
    svc: object
    test_accuracy: float

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.svc.predict(np.asarray(images).reshape(len(images), -1) / (digits.GRAY_LEVELS - 1))


def fit_digit_classifier(data: DigitsData) -> DigitClassifier:
    from sklearn.svm import SVC

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) / (digits.GRAY_LEVELS - 1)

    svc = SVC(gamma="scale").fit(flat(data.train_images), data.train_labels)
    return DigitClassifier(svc, float(svc.score(flat(data.test_images), data.test_labels)))


@dataclass
class GenerationConfig:
    samples_per_digit: int = 20
    temperature: float = 1.0
    seed: int = 0


def evaluate_generation(model: nn.Module, vocab: DigitsVocab, data: DigitsData, classifier: DigitClassifier,
                        config: GenerationConfig | None = None, progress: bool = False) -> dict:
    """gen_acc (share of sampled images classified as the prompted digit) and image_nll."""
    config = config or GenerationConfig()
    prompted = np.repeat(np.arange(10), config.samples_per_digit)
    with tqdm(total=2, desc="eval generation", disable=not progress) as bar:
        images = sample_images(model, vocab, prompted, config.temperature, config.seed)
        bar.update()
        nll = image_nll(model, vocab, data.test_images, data.test_labels)
        bar.update()
    return {"gen_acc": float((classifier.predict(images) == prompted).mean()), "image_nll": nll}
