"""Tiny random-weight Hugging Face decoders for the MoDE tests (built offline, no hub access).

Vocabulary of the Llama/Qwen2 models: 64 ids; image codes 40..59, end-of-image 60,
begin-of-image 61 (``SPEC``). The Chameleon model uses the real Chameleon/Anole id layout.
"""
import copy
import functools

import torch

import mode

VOCAB = 64
IMAGE_LO, IMAGE_HI, END_IMAGE, BEGIN_IMAGE = 40, 60, 60, 61
SPEC = mode.ModalitySpec(image_token_ranges=((IMAGE_LO, IMAGE_HI),), begin_image=BEGIN_IMAGE, end_image=END_IMAGE)
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@functools.cache
def _base(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **SIZES))
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **SIZES))
    if kind == "chameleon":
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration
        vocabulary_map = {f"IMGIMG{i}": i for i in range(4, 8196)}
        vocabulary_map.update({"<eoss>": 8196, "<racm3:break>": 8197, "<image>": 8198})
        # The VQ image tokenizer is unused by the tests: the smallest that builds.
        vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                  attn_resolutions=[], latent_channels=8, resolution=8, in_channels=3)
        return ChameleonForConditionalGeneration(ChameleonConfig(vocab_size=8200, vocabulary_map=vocabulary_map,
                                                                 vq_config=vq, **SIZES))
    raise ValueError(kind)


def tiny_model(kind: str = "llama"):
    """A fresh copy of the tiny random-init model of that kind, in eval mode."""
    return copy.deepcopy(_base(kind)).eval()


def config(**overrides) -> mode.MoDEConfig:
    return mode.MoDEConfig(**{"modality": SPEC, "dropout": 0.0, **overrides})


def peft_config(spec: mode.ModalitySpec = SPEC, **overrides):
    """``config()``'s settings as a ``mode.MoDEPeftConfig`` (imports peft)."""
    fields = dict(r=8, lora_alpha=16, lora_dropout=0.0, image_token_ranges=spec.image_token_ranges,
                  begin_image=spec.begin_image, end_image=spec.end_image)
    return mode.MoDEPeftConfig(**{**fields, **overrides})


def randomize_adapters(model, std: float = 0.2, seed: int = 1):
    """Non-zero lora_B (fresh adapters are exactly zero), so that routing changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "mode_B" in name:  # apply_mode's and PEFT's layers
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def image_sequence(batch: int = 2, seed: int = 0, spec: mode.ModalitySpec = SPEC) -> torch.Tensor:
    """[batch, 16] ids of ``spec``'s vocabulary: text, then <boi>, codes and a text id inside the
    image, <eoi>, text (text ids lie below the image codes)."""
    gen = torch.Generator().manual_seed(seed)
    (image_lo, image_hi), = spec.image_token_ranges

    def text(n):
        return torch.randint(0, image_lo, (batch, n), generator=gen)

    def codes(n):
        return torch.randint(image_lo, image_hi, (batch, n), generator=gen)

    def marker(v):
        return torch.full((batch, 1), v)

    return torch.cat([text(3), marker(spec.begin_image), codes(2), text(2), codes(2), marker(spec.end_image), text(5)],
                     dim=1)


def image_modality(batch: int = 2) -> torch.Tensor:
    """The modality ids of ``image_sequence``: 1 from <boi> to <eoi> inclusive."""
    ids = torch.zeros(batch, 16, dtype=torch.long)
    ids[:, 3:11] = 1
    return ids
