"""Tiny random-weight Hugging Face decoders for the MoDE tests (built offline, no hub access).

Vocabulary of the Llama/Qwen2 models: 64 ids; image codes 40..59, end-of-image 60,
begin-of-image 61 (``SPEC``). The Chameleon model uses the real Chameleon/Anole id layout; the
Emu3 model the names of Emu3's vocabulary (``EMU3_VOCAB``); the Janus model a SigLIP tower, a VQ
model and a Llama of ``JANUS_VOCAB`` whose counts agree (``JANUS_IMAGE_TOKENS``).
``save_tiny_checkpoint`` saves Chameleon, Emu3 and Janus with a processor (an offline word-level
tokenizer).
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
        vocabulary_map = {chameleon_code_name(code): 4 + code for code in range(8192)}
        vocabulary_map.update({"<eoss>": 8196, "<racm3:break>": 8197, "<image>": 8198})
        # The smallest VQ image tokenizer that builds: no downsampling, 16 codes (ids 4..19), an 8x8
        # image -> 64 codes.
        vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                  attn_resolutions=[], latent_channels=8, resolution=8, in_channels=3)
        return ChameleonForConditionalGeneration(ChameleonConfig(
            vocab_size=CHAMELEON_VOCAB, vocabulary_map=vocabulary_map, vq_config=vq, **SIZES))
    if kind == "emu3":
        from transformers import Emu3Config, Emu3ForConditionalGeneration
        text = dict(SIZES, max_position_embeddings=256, pad_token_id=1, bos_token_id=0, eos_token_id=0)
        # VQ: 8x downsampling (the processor's fixed ratio), 16 codes; GroupNorm needs 32 channels
        vq = dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                  channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                  num_attention_heads=1)
        return Emu3ForConditionalGeneration(Emu3Config(text_config=dict(text, vocab_size=len(EMU3_VOCAB)),
                                                       vq_config=vq, vocabulary_map=EMU3_VOCAB))
    if kind == "janus":
        from transformers import JanusConfig, JanusForConditionalGeneration
        # 16x16 images: the vision tower's 8x8 patches and the VQ grid (8x downsampling: GroupNorm
        # needs 32 channels) both give 2x2 = JANUS_IMAGE_TOKENS; JanusConfig sets the VQ grid from the
        # vision tower (vq_config.num_patches = image_size // patch_size).
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      image_size=JANUS_IMAGE_SIZE, patch_size=8, projection_dim=32, depth=2,
                      num_image_tokens=JANUS_IMAGE_TOKENS)
        vq = dict(embed_dim=8, num_embeddings=JANUS_CODES, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                  num_res_blocks=1, attn_resolutions=[], latent_channels=8, resolution=JANUS_IMAGE_SIZE,
                  projection_dim=32, image_token_embed_dim=32)
        text = dict(SIZES, vocab_size=len(JANUS_VOCAB), pad_token_id=2, bos_token_id=0, eos_token_id=1)
        model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                          image_token_id=JANUS_VOCAB["<image_placeholder>"]))
        with torch.no_grad():  # a random bias (it initialises to zeros), so that folding it is tested
            model.model.generation_head.vision_head.bias.normal_()
        return model
    raise ValueError(kind)


def chameleon_code_name(code: int) -> str:
    """Chameleon's name of VQ code ``code`` in its vocabulary: digits spelt A-J, then Z (IMGIMGBCZ = 12)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


CHAMELEON_VOCAB = 8224  # the Chameleon id layout (codes 4..8195, markers 8196/8197, <image> 8198), then words
WORDS = ["what", "color", "is", "it", "red", "blue", "green", "a", "square", "?", "*"] + [str(d) for d in range(10)]
EMU3_CODES = 16
EMU3_VOCAB = {"<|endoftext|>": 0, "<pad>": 1, "<image>": 2, "<|image start|>": 3, "<|image end|>": 4,
              "<|image token|>": 5, "<|extra_200|>": 6, "<|extra_201|>": 7, "<unk>": 8,
              **{f"<|visual token {i:06d}|>": 9 + i for i in range(EMU3_CODES)}}
EMU3_VOCAB.update({w: len(EMU3_VOCAB) + i for i, w in enumerate(WORDS)})
JANUS_IMAGE_SIZE, JANUS_IMAGE_TOKENS, JANUS_CODES = 16, 4, 16
JANUS_VOCAB = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, "<image_placeholder>": 4, "<begin_of_image>": 5,
               "<end_of_image>": 6}
JANUS_VOCAB.update({w: len(JANUS_VOCAB) + i for i, w in enumerate(WORDS)})


def _word_tokenizer(vocab: dict, add_bos: bool = True, **special):
    """A fast tokenizer over whole words (digits and punctuation split off), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens([token for token in vocab if token.startswith("<")])  # matched before splitting
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    if add_bos:  # as Llama's (Chameleon's) tokenizer; Emu3's processor writes the bos itself
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **special)


def save_tiny_checkpoint(kind: str, path):
    """The tiny model of ``kind`` ("chameleon" or "emu3") and its processor (a word-level tokenizer
    and the model's image processor, sized for 8x8 (Chameleon) or small (Emu3) images), saved
    with save_pretrained into ``path``; returns ``path``."""
    tiny_model(kind).save_pretrained(path)
    if kind == "chameleon":
        from transformers import ChameleonImageProcessor, ChameleonProcessor
        vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<reserved08706>": 3, "<eoss>": 8196, "<racm3:break>": 8197,
                 "<image>": 8198, "<unk>": 8199}
        vocab.update({w: 8200 + i for i, w in enumerate(WORDS)})
        tokenizer = _word_tokenizer(vocab, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                    sep_token="<reserved08706>")
        image_processor = ChameleonImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
        processor = ChameleonProcessor(image_processor, tokenizer, image_seq_length=64)
    elif kind == "emu3":
        from transformers import Emu3ImageProcessor, Emu3Processor
        tokenizer = _word_tokenizer(EMU3_VOCAB, add_bos=False, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                    pad_token="<pad>", extra_special_tokens={
                                        "image_token": "<image>", "boi_token": "<|image start|>",
                                        "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                                        "eof_token": "<|extra_201|>"})
        processor = Emu3Processor(Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32, spatial_factor=8),
                                  tokenizer)
    elif kind == "janus":
        from transformers import JanusImageProcessorPil, JanusProcessor
        tokenizer = _word_tokenizer(JANUS_VOCAB, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                    extra_special_tokens={"image_token": "<image_placeholder>",
                                                          "boi_token": "<begin_of_image>",
                                                          "eoi_token": "<end_of_image>"})
        size = {"height": JANUS_IMAGE_SIZE, "width": JANUS_IMAGE_SIZE}
        processor = JanusProcessor(JanusImageProcessorPil(size=size, min_size=4), tokenizer,
                                   num_image_tokens=JANUS_IMAGE_TOKENS)
    else:
        raise ValueError(kind)
    processor.save_pretrained(path)
    return path


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


def codes_as_gray(tokens: torch.Tensor) -> torch.Tensor:
    """A stand-in VQ decoder for ``--decoder tiny_models:codes_as_gray``: 64 codes of the tiny
    Chameleon (ids 4..19) as an 8x8 gray image."""
    return ((tokens - 4).float() / 15).view(8, 8)
