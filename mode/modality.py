"""Which tokens are image tokens: a per-token modality id (0 text, 1 image) from token ids alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, IMAGE = 0, 1
NUM_MODALITIES = 2


@dataclass(frozen=True)
class ModalitySpec:
    """How to tell image tokens from text tokens by id.

    A token is an image token (modality 1) when its id lies in one of ``image_token_ranges``
    (``(lo, hi)``, hi exclusive), when it is the begin- or end-of-image marker, or when it stands
    between a begin marker and the next end marker. Every other token is text (modality 0).
    Markers are optional but come as a pair.

    ``image_codes_in_vocab``: whether these ids are ids of the model's own vocabulary (its output head
    scores them), as for Chameleon/Anole and Emu3, so that a model whose vocabulary lacks them is another
    model (the adapter loaders refuse it); a family that keeps its image codes apart sets False.
    """

    image_token_ranges: tuple[tuple[int, int], ...] = ()
    begin_image: int | None = None
    end_image: int | None = None
    image_codes_in_vocab: bool = True

    def __post_init__(self):
        try:
            ranges = tuple((int(lo), int(hi)) for lo, hi in self.image_token_ranges)
        except (TypeError, ValueError):
            raise ValueError(f"image_token_ranges: expected pairs (lo, hi), got {self.image_token_ranges!r}") from None
        for lo, hi in ranges:
            if not 0 <= lo < hi:
                raise ValueError(f"image_token_ranges: expected 0 <= lo < hi (hi exclusive), got ({lo}, {hi})")
        object.__setattr__(self, "image_token_ranges", ranges)
        if (self.begin_image is None) != (self.end_image is None):
            raise ValueError("begin_image and end_image: give both markers or neither, got "
                             f"begin_image={self.begin_image!r}, end_image={self.end_image!r}")
        if self.begin_image is not None and self.begin_image == self.end_image:
            raise ValueError(f"begin_image and end_image must differ, both are {self.begin_image}")
        if not isinstance(self.image_codes_in_vocab, bool):
            raise ValueError(f"image_codes_in_vocab: expected a bool, got {self.image_codes_in_vocab!r}")
        if not ranges and self.begin_image is None:
            raise ValueError("ModalitySpec: give image_token_ranges or begin/end markers, else every token is text")

    @classmethod
    def chameleon(cls) -> ModalitySpec:
        """Chameleon / Anole: image codes 4..8195, begin-of-image 8197, end-of-image 8196."""
        return cls(image_token_ranges=((4, 8196),), begin_image=8197, end_image=8196)

    @property
    def has_markers(self) -> bool:
        """Whether a token's modality can depend on earlier tokens (inside begin..end)."""
        return self.begin_image is not None

    def modality_ids(self, input_ids: torch.Tensor, inside_image: torch.Tensor | None = None) -> torch.Tensor:
        """Modality ids (int64, 0 text / 1 image) of ``input_ids`` [..., T], on their device.

        ``inside_image`` (bool [...]) says whether each row's earlier tokens, not in this tensor,
        ended inside an image (a begin marker not yet closed), as in cached generation.
        """
        return self.modality_ids_and_state(input_ids, inside_image)[0]

    def modality_ids_and_state(self, input_ids: torch.Tensor, inside_image: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(modality_ids, inside_image_after)``: the ids, and per row whether the sequence ends
        inside an image (to continue with the next tokens of the same rows).

        Device ops only (no host sync): a token is inside an image when the last marker at or
        before it is a begin marker, or, with no marker so far in this chunk, when the row was
        inside an image before the chunk.
        """
        integer = isinstance(input_ids, torch.Tensor) and not input_ids.dtype.is_floating_point \
            and input_ids.dtype != torch.bool
        if not integer:
            raise ValueError(f"input_ids: expected an integer tensor, got "
                             f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if input_ids.dim() < 1:
            raise ValueError("input_ids: expected shape [..., T], got a scalar")
        rows = input_ids.shape[:-1]
        if inside_image is None:
            inside_image = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        elif tuple(inside_image.shape) != tuple(rows):
            raise ValueError(f"inside_image: expected shape {list(rows)} (input_ids.shape[:-1]), "
                             f"got {list(inside_image.shape)}")
        image = torch.zeros_like(input_ids, dtype=torch.bool)
        for lo, hi in self.image_token_ranges:
            image |= (input_ids >= lo) & (input_ids < hi)
        if not self.has_markers:
            return image.long(), inside_image
        is_begin = input_ids == self.begin_image
        marker = is_begin | (input_ids == self.end_image)
        position = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        last_marker = torch.where(marker, position, torch.full_like(position, -1)).cummax(dim=-1).values
        after_begin = is_begin.gather(-1, last_marker.clamp(min=0))
        inside = torch.where(last_marker >= 0, after_begin, inside_image.unsqueeze(-1))
        modality = image | marker | inside
        inside_after = inside[..., -1] if input_ids.shape[-1] else inside_image
        return modality.long(), inside_after
