"""Janus's records: understanding images stay as pixels, generated images as codes.

A task record keeps the processor's placeholders (``<begin_of_image>``, ``num_image_tokens`` x
``<image_placeholder>``, ``<end_of_image>``) in ``input_ids`` and names its image's pixel values
(``[3, S, S]``, the processor's) in a sidecar file, ``"pixel_values": "tasks.pixels/0.pt"``
(relative to the JSONL; one 384x384 image is 442k floats, too many for a JSON line); the
vision tower's features replace the placeholders in the model's forward. A generation-stream record
is the caption, <begin_of_image> and the image's VQ codes numbered after the text vocabulary
(``mode.families.janus``); a prompt is the caption and <begin_of_image> (the processor's
``generation_mode="image"``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ...families import FAMILIES
from ...hf.models import cache_in, cache_keyword, decoder_of, hf_model, model_device
from ...model import routing_state

PIXELS_FIELD = "pixel_values"


def sidecar_dir(output) -> str:
    """The folder, beside ``output``, of its records' pixel files."""
    return f"{output.stem}.pixels"


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
    text_vocab = FAMILIES["janus"].text_vocab(model)
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
    family, host, decoder = FAMILIES["janus"], hf_model(model), decoder_of(model)
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
    ``generation.generate_images`` writes them for the other families."""
    from .generation import load_prompt, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, family = model_device(model), FAMILIES["janus"]
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
