"""The pretrained unified model of the `digits` benchmark.

A tiny random-init Llama (`LlamaForCausalLM`) is trained on CPU on both modalities of
`mode.digits`: answering questions about the digit in an image (understanding) and drawing a digit from
"draw a <digit>" (generation), plus the text-only facts the continual tasks answer with
("seven is odd"). `load_or_pretrain` caches the weights on disk under a hash of
(vocabulary, model config, pretraining config), so later runs skip pretraining.

Its evaluation: `evaluation` (the understanding tasks) and `generation` (drawn images and their judge).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mode_kernels.cache import cache_dir

from ..schedule import cosine_lr
from . import data as digits
from .data import DigitsData, DigitsVocab

CACHE_FORMAT = 3  # bump when the meaning of cached weights changes


@dataclass
class DigitsModelConfig:
    """Shape of the tiny Llama (about 0.4M parameters at these defaults)."""
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 96  # longest sample is 82 tokens
    # Std of the normal init of every weight matrix, about 1 / sqrt(hidden_size). Hugging Face's
    # default, 0.02, leaves the attention logits near zero and the attention uniform at init; measured
    # (pretraining seed 1, 700 steps): generation ignored the prompted digit for 300 steps (gen_acc
    # 0.085-0.14, chance 0.10) and was still climbing when the learning rate ran out (0.475; seed 0:
    # 0.85). At 0.08 gen_acc reached 0.57 by step 200 and 0.71 by step 300 on the same seed.
    initializer_range: float = 0.08


@dataclass
class PretrainConfig:
    """How the pretrained model is trained; every field is part of the cache key."""
    # 700 steps: digit naming 0.845, gen_acc 0.85 (measured); two 600-step runs gave gen_acc 0.45-0.68.
    steps: int = 700
    # Generation is learnt more slowly than naming the digit, so it gets more rows per batch.
    understanding_rows: int = 24  # rows per batch of "what digit is this ? <image>" -> digit
    generation_rows: int = 40  # rows per batch of "draw a <digit>" -> image
    text_rows: int = 8  # rows per batch of text-only sentences (`digits.text_facts`)
    questions: str = digits.DEFAULT_PRETRAIN_QUESTIONS  # the understanding rows' `digits.PRETRAIN_QUESTIONS`
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    split_seed: int = 0  # the train/test split of load_digits


def build_model(vocab: DigitsVocab, config: DigitsModelConfig) -> nn.Module:
    """A randomly initialised LlamaForCausalLM over the digits vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(llama_config)


# ----------------------------------------------------------------------------- pretraining

def mean_token_loss(model: nn.Module, examples: Sequence[digits.Example], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of a batch of examples."""
    batch = digits.collate(examples, pad_id)
    # No attention mask: padding is on the right, so under the causal mask no real token
    # sees a pad, and pad positions carry no loss; this keeps the fast causal attention path.
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=digits.IGNORE_INDEX)


def pretraining_streams(vocab: DigitsVocab, data: DigitsData,
                        config: PretrainConfig) -> dict[str, tuple[list[digits.Example], int]]:
    """Each pretraining stream's examples and its rows per batch: understanding (every question of
    ``config.questions`` about every training image), generation, and the text facts."""
    understanding = [row for task in digits.PRETRAIN_QUESTIONS[config.questions]
                     for row in digits.task_examples(vocab, task, data.train_images, data.train_labels)]
    return {
        "understanding": (understanding, config.understanding_rows),
        "generation": (digits.generation_examples(vocab, data.train_images, data.train_labels),
                       config.generation_rows),
        "text": ([digits.text_example(vocab, words) for words in digits.text_facts()], config.text_rows),
    }


def pretrain(vocab: DigitsVocab, data: DigitsData, model_config: DigitsModelConfig,
             config: PretrainConfig, progress: bool = True) -> nn.Module:
    """Train a fresh model on understanding (`config.questions` about the image), generation and the text facts;
    returns it in eval mode.

    Each stream is averaged on its own, so the 2-token answers weigh as much as the
    66-token images.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(vocab, model_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    streams = pretraining_streams(vocab, data, config)
    bar = tqdm(range(config.steps), desc="pretrain digits", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.warmup_steps, config.lr)
        losses = {name: mean_token_loss(model, [examples[i] for i in rng.integers(len(examples), size=rows)], vocab.pad)
                  for name, (examples, rows) in streams.items() if rows > 0}
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        bar.set_postfix({name: f"{loss.item():.3f}" for name, loss in losses.items()})
    return model.eval()


# ----------------------------------------------------------------------------- cache

@dataclass
class Pretrained:
    """A pretrained digits model and where it came from."""
    model: torch.nn.Module
    vocab: DigitsVocab
    data: DigitsData
    model_config: DigitsModelConfig
    pretrain_config: PretrainConfig
    cache_path: Path
    from_cache: bool  # True when the weights were loaded, False when pretraining ran
    train_seconds: float  # pretraining time (as measured when the cache was written)


def default_cache_dir() -> Path:
    return cache_dir()


def cache_key(vocab: DigitsVocab, model_config: DigitsModelConfig, config: PretrainConfig) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "vocab": vocab.tokens, "model": asdict(model_config),
                       "pretrain": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_cache(path: Path, model: torch.nn.Module, key: str, train_seconds: float) -> None:
    """safetensors file with a digest of its tensors, written to a temp file then renamed."""
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors that share storage (as tied embeddings would)
    tensors = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    metadata = {"cache_key": key, "sha256": _tensors_digest(tensors), "train_seconds": repr(train_seconds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: Path, model: torch.nn.Module, key: str) -> float:
    """Load cached weights into `model`; returns their train_seconds. Raises ValueError if corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from err
    if metadata.get("cache_key") != key:
        raise ValueError(f"cache key {metadata.get('cache_key')!r} != expected {key!r}")
    if metadata.get("sha256") != _tensors_digest(tensors):
        raise ValueError("tensor checksum mismatch")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights do not fit the model: {err}") from err
    return float(metadata.get("train_seconds", "nan"))


def load_or_pretrain(model_config: DigitsModelConfig | None = None, pretrain_config: PretrainConfig | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Pretrained:
    """The pretrained digits model: from the cache if a valid entry exists, else trained and cached.

    A cache file that cannot be read, or whose key or checksum does not match, is reported
    with a warning and rebuilt; it is never used.
    """
    model_config = model_config or DigitsModelConfig()
    pretrain_config = pretrain_config or PretrainConfig()
    vocab = DigitsVocab(pretrain_config.questions)
    data = digits.load_digits_split(seed=pretrain_config.split_seed)
    key = cache_key(vocab, model_config, pretrain_config)
    path = Path(cache_dir or default_cache_dir()) / f"digits-{key}.safetensors"
    if path.exists():
        model = build_model(vocab, model_config)
        try:
            train_seconds = _read_cache(path, model, key)
            return Pretrained(model.eval(), vocab, data, model_config, pretrain_config, path, True, train_seconds)
        except ValueError as err:
            warnings.warn(f"corrupt pretrained-model cache {path}: {err}; pretraining again", stacklevel=2)
    start = time.perf_counter()
    model = pretrain(vocab, data, model_config, pretrain_config, progress=progress)
    train_seconds = time.perf_counter() - start
    _write_cache(path, model, key, train_seconds)
    return Pretrained(model, vocab, data, model_config, pretrain_config, path, False, train_seconds)
