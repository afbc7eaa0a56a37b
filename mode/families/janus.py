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

import torch
from torch import Tensor, nn

from ..hf.models import hf_model
from ..modality import ModalitySpec
from .base import ImageHead


class Janus:
    name = "janus"

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
