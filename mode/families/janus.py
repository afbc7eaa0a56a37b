"""Janus / Janus-Pro (transformers' ``JanusForConditionalGeneration``): understanding images enter
as SigLIP features at ``config.image_token_id`` placeholders; generated images are VQ codes with
their own embeddings (``generation_embeddings`` + ``generation_aligner``) and their own head
(``generation_head``), apart from the text ``lm_head``. The language model in the middle is shared
and carries the MoDE adapters.

Image codes 0..codes-1 overlap text ids, so records number code c as ``text_vocab + c``: the
modality spec reads placeholders and those ids as image tokens, the rest as text (Janus's
<begin_of_image> / <end_of_image> ids are not in its config, so they are routed as text).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..hf.models import cache_in, cache_keyword, decoder_of, hf_model, model_device
from ..modality import ModalitySpec
from ..model import routing_state
from .base import ImageHead, SharedVocabulary
from .images import load_prompt, save_png


class Janus(SharedVocabulary):
    name = "janus"
    separate_image_stream = True  # codes embedded and scored by the generation embeddings and head
    placeholders_in_records = True  # the vision tower's features replace them in its forward

    @staticmethod
    def text_vocab(model: nn.Module) -> int:
        """Ids below it are text (the ``lm_head``'s rows); from it on, image codes."""
        return hf_model(model).config.text_config.vocab_size

    @staticmethod
    def num_codes(model: nn.Module) -> int:
        return hf_model(model).config.vq_config.num_embeddings

    def modality_spec(self, model: nn.Module) -> ModalitySpec:
        text, placeholder = self.text_vocab(model), hf_model(model).config.image_token_id
        # the generated codes are numbered after the text vocabulary, past the text head's rows: the adapters'
        # vocabulary check (mode.adapter_check) does not apply
        return ModalitySpec(image_token_ranges=((placeholder, placeholder + 1), (text, text + self.num_codes(model))),
                            image_codes_in_vocab=False)

    def preset_spec(self, model: nn.Module | None, vocabulary_map: dict | None = None) -> ModalitySpec:
        if model is None:
            raise ValueError("modality janus: read from the model's config; pass model=")
        return self.modality_spec(model)

    def record_vocab_size(self, model: nn.Module) -> int:
        return self.text_vocab(model) + self.num_codes(model)

    def stream_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                      modality_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Text ids through the text embeddings, codes (ids >= text_vocab) through the generation
        embeddings and aligner, as Janus's image ``generate`` feeds them; the modality ids from the
        ids (the language model sees embeddings only)."""
        host, text = hf_model(model), self.text_vocab(model)
        is_code = input_ids >= text
        text_embeds = host.get_input_embeddings()(input_ids.masked_fill(is_code, 0))
        code_embeds = host.prepare_embeddings_for_image_generation((input_ids - text).clamp(min=0))
        inputs = {"inputs_embeds": torch.where(is_code[..., None], code_embeds.to(text_embeds.dtype), text_embeds),
                  "modality_ids": self.modality_spec(model).modality_ids(input_ids) if modality_ids is None
                  else modality_ids}
        return inputs | ({} if attention_mask is None else {"attention_mask": attention_mask})

    def image_head(self, model: nn.Module) -> ImageHead:
        head = hf_model(model).model.generation_head
        return ImageHead(head.vision_head.weight, head.vision_head.bias,
                         nn.Sequential(head.proj_out, head.activation_fn), (0, self.num_codes(model)),
                         first_id=self.text_vocab(model))

    @torch.no_grad()
    def decode_pixels(self, model: nn.Module, codes: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """Codes (0..codes-1) of one image -> [3, H, W] in [0, 1]: the VQ decoder's output is in
        [-1, 1] (Janus's image processor normalises with mean and std 0.5)."""
        vq = hf_model(model).model.vqmodel
        pixels = vq.decode(codes.view(1, -1).to(next(vq.parameters()).device))[0].float().cpu()
        return ((pixels + 1) / 2).clamp(0, 1)

    def tokenize_records(self, model: nn.Module, processor, template: str, records: list) -> list[dict] | None:
        """Task records keep their placeholders and their pixels (a tensor, for a sidecar file);
        stream records: the caption, then the codes numbered after the text vocabulary."""
        return [{**obj, **({"task": r.fields["task"]} if "task" in r.fields else {})}
                for r, obj in zip(records, tokenize(model, processor, template, records))]

    def generation_prompt(self, processor, caption: str, ratio: str = "1:1", image_area: int | None = None) -> dict:
        return prompt(processor, caption)

    def generate_images(self, model: nn.Module, prompt_files: Sequence[str | Path], out_dir: str | Path,
                        temperature: float = 1.0, seed: int = 0) -> list[dict] | None:
        """Classifier-free guidance in its own cached loop (``sample_codes``), one prompt at a time."""
        return generate_images(model, list(prompt_files), out_dir, temperature, seed)


PIXELS_FIELD = "pixel_values"


def tokenize(model: nn.Module, processor, template: str, records: list) -> list[dict]:
    """Task records -> ``{"input_ids", "answer_start", "pixel_values": Tensor}`` (the caller writes
    the tensor to its sidecar file); stream records -> ``{"input_ids", "answer_start"}``."""
    tokenizer, kind = processor.tokenizer, records[0].kind
    images = [r.load_image() for r in records]
    if kind == "task":
        out = []
        for r, image in zip(records, images):
            text = template.format(image=processor.image_token, question=r.fields["question"])
            batch = processor(text=[text], images=[image], return_tensors="pt")
            ids = batch["input_ids"][0].tolist()
            answer = tokenizer(r.fields["answer"], add_special_tokens=False)["input_ids"]
            out.append({"input_ids": ids + answer + [tokenizer.eos_token_id], "answer_start": len(ids),
                        PIXELS_FIELD: batch["pixel_values"][0]})
        return out
    codes = image_codes(model, processor(images=images, return_tensors="pt")["pixel_values"])
    text_vocab = Janus.text_vocab(model)
    out = []
    for r, row in zip(records, codes):
        caption = processor(text=[r.fields["caption"]], generation_mode="image")["input_ids"][0]
        caption = list(caption.tolist() if isinstance(caption, Tensor) else caption)
        out.append({"input_ids": caption + (row + text_vocab).tolist(), "answer_start": len(caption)})
    return out


def image_codes(model: nn.Module, pixels: Tensor) -> Tensor:
    """[B, h*w] VQ codes of the processor's pixels; refuses a grid that is not the model's
    ``vision_config.num_image_tokens`` (transformers 5.25 defaults it to 576 whatever the image size,
    and the image ``generate`` loop draws that many codes)."""
    inner = hf_model(model).model
    with torch.no_grad():
        codes = inner.vqmodel.encode(pixels.to(model_device(model), next(model.parameters()).dtype)).image_tokens
    codes = codes.view(len(pixels), -1).cpu()
    expected = inner.vision_model.config.num_image_tokens
    if codes.shape[1] != expected:
        raise ValueError(f"mode-prepare: the VQ encoder gives {codes.shape[1]} codes per image, the model's "
                         f"vision_config.num_image_tokens is {expected}; they must agree")
    return codes


def prompt(processor, caption: str) -> dict:
    ids = processor(text=[caption], generation_mode="image")["input_ids"][0]
    return {"input_ids": list(ids.tolist() if isinstance(ids, Tensor) else ids)}


GUIDANCE = 5.0  # transformers' default guidance_scale for Janus image generation


@torch.no_grad()
def sample_codes(model: nn.Module, prompts: Tensor, generator: torch.Generator, guidance: float = GUIDANCE,
                 temperature: float = 1.0) -> Tensor:
    """Equal-length prompts [B, L] (caption, <begin_of_image>) -> [B, num_image_tokens] codes, sampled
    with classifier-free guidance in our own cached loop: the unconditional rows are the prompts with
    every token but the first and the last padded, as transformers' ``generate(generation_mode="image")``
    does; logits = uncond + guidance * (cond - uncond). Each step's code goes in through the
    generation embeddings with its modality ids given (the model's own spec), so a MoDE model routes
    it to its image expert; transformers' loop would give the language model no ids."""
    family, host, decoder = Janus(), hf_model(model), decoder_of(model)
    spec, head = routing_state(model).config.modality, family.image_head(model)
    keyword, text_vocab = cache_keyword(decoder), family.text_vocab(model)
    unconditional = prompts.clone()
    unconditional[:, 1:-1] = host.config.text_config.pad_token_id or 0
    ids = torch.cat([prompts, unconditional])
    out = decoder(**family.stream_inputs(model, ids, modality_ids=spec.modality_ids(ids)), use_cache=True)
    codes = []
    steps = host.model.vision_model.config.num_image_tokens
    for step in range(steps):
        conditional, free = head.logits(out.last_hidden_state[:, -1]).float().chunk(2)
        logits = free + guidance * (conditional - free)
        code = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]
        codes.append(code)
        if step + 1 == steps:
            break
        ids = (torch.cat([code, code]) + text_vocab)[:, None]
        out = decoder(**family.stream_inputs(model, ids, modality_ids=spec.modality_ids(ids)), use_cache=True,
                      **{keyword: cache_in(out)})
    return torch.stack(codes, dim=1)


def generate_images(model: nn.Module, prompt_files: list, out_dir, temperature: float = 1.0, seed: int = 0,
                    guidance: float = GUIDANCE) -> list[dict]:
    """One image per prompt file (``mode-prepare``'s Janus prompts), decoded by the VQ decoder:
    ``<stem>.image_tokens.json`` (codes 0..codes-1) and ``<stem>.png`` under ``out_dir``, as
    ``mode.workloads.hf_model.generation.generate_images`` writes them for the other families."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, family = model_device(model), Janus()
    generator = torch.Generator(device=device).manual_seed(seed)
    results, was_training = [], model.training
    model.eval()
    try:
        for path in prompt_files:
            prompt_ids = load_prompt(path, family.text_vocab(model))
            codes = sample_codes(model, torch.tensor([prompt_ids], device=device), generator, guidance,
                                 temperature)[0].cpu()
            stem = Path(path).name.rsplit(".", 1)[0]
            tokens, png = out_dir / f"{stem}.image_tokens.json", out_dir / f"{stem}.png"
            tokens.write_text(json.dumps({"prompt": prompt_ids, "image_tokens": codes.tolist()}) + "\n")
            save_png(family.decode_pixels(model, codes), png)
            results.append({"prompt": str(path), "tokens": str(tokens), "png": str(png)})
    finally:
        model.train(was_training)
    return results
