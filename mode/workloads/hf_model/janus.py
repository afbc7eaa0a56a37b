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

import torch
from torch import Tensor, nn

from ...families import FAMILIES
from ...hf.models import hf_model, model_device

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
