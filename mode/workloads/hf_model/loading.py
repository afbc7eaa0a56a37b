"""A local Hugging Face model directory: load the model and name its image tokens.

    model = load_model("/ckpt/anole-7b-hf", dtype=torch.bfloat16, device="cuda")
    spec = modality_spec_for("chameleon", vocab_size(model))      # or "4:8196,begin=8197,end=8196"
    model = mode.apply_mode(model, mode.MoDEConfig(modality=spec))

Its evaluation: ``evaluation.exact_match_accuracy``; drawing images: ``generation.generate_images``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ...families import FAMILIES, family_of
from ...hf.models import decoder_of, hf_model
from ...modality import ModalitySpec
from .data import TokenChecks

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- loading

def load_model(path: PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """A local Hugging Face checkpoint directory (``save_pretrained`` layout) as a causal LM, in
    eval mode. Causal-LM architectures load through ``AutoModelForCausalLM``; Chameleon / Anole
    (converted checkpoints), which transformers files under image-text-to-text, through
    ``AutoModelForImageTextToText``, and so does Emu3 (its causal-LM class has no VQ model).
    Never touches the hub. Raises with the reason when the
    directory is missing, lacks a config or weights, or its weights do not cover the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face checkpoint directory "
                         "(written by save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}/config.json: not a usable Hugging Face config: {exc}") from None
    family = FAMILIES.get(config.model_type)
    if (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and not (family is not None and family.load_as_image_text_to_text)):
        auto_class = AutoModelForCausalLM
    elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto_class = AutoModelForImageTextToText
    else:
        raise ValueError(f"{path}: model type {config.model_type!r} is neither a causal LM nor an "
                         "image-text-to-text model in this transformers version")
    try:
        model, info = auto_class.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                 output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot load the weights: {exc}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}; "
                         "they would be random")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{path}: {type(model).__name__} has no linear output head")
    decoder_of(model)  # raises when there is no decoder stack
    if device is not None:
        model.to(device)
    return model.eval()


def token_checks(model: nn.Module, spec: ModalitySpec, task_labels: bool = True) -> TokenChecks:
    """The data checks ``model`` informs: its processor's image placeholder id (``config.image_token_id``,
    Chameleon's and Emu3's ``<image>``) and, for task data (``task_labels``), whether its forward
    masks the logits of image codes."""
    config = hf_model(model).config
    # placeholders that stay in the record (Janus's): the vision tower's features replace them in its forward
    placeholder = None if family_of(model).placeholders_in_records else getattr(config, "image_token_id", None)
    return TokenChecks(spec, placeholder_id=placeholder,
                       image_logits_masked=task_labels and family_of(model).image_logits_masked)


def masked_logit_ids(model: nn.Module) -> torch.Tensor | None:
    """The ids whose logits ``model``'s forward sets to the lowest float, so left out of its training loss
    (Chameleon / Anole: its image codes, ``vocabulary_mapping.image_tokens``); None where it masks none."""
    return family_of(model).masked_logit_ids(model)


def vocab_size(model: nn.Module) -> int:
    """The ids a record may hold: the output head's rows, and for Janus its image codes after them
    (``mode.families``)."""
    return family_of(model).record_vocab_size(model)


def modality_spec_for(name_or_args: str | Mapping | ModalitySpec,
                      vocab_size: int | None = None, vocabulary_map: Mapping[str, int] | None = None,
                      model: nn.Module | None = None) -> ModalitySpec:
    """The ``ModalitySpec`` named by a ``--modality`` value, checked against the vocabulary.

    Accepts a preset name ("chameleon", "anole": image codes 4..8195, begin 8197, end 8196;
    "emu3": read from the checkpoint's ``vocabulary_map``, see ``mode.families.emu3``; "janus": from
    ``model``'s config, see ``mode.families.janus``), a
    string of comma-separated items ``LO:HI`` (an image-code range, HI exclusive), ``begin=ID``
    and ``end=ID`` (e.g. ``"4:8196,begin=8197,end=8196"``), a dict of ``ModalitySpec`` fields,
    or a ``ModalitySpec``.
    """
    if isinstance(name_or_args, ModalitySpec):
        spec = name_or_args
    elif isinstance(name_or_args, Mapping):
        spec = ModalitySpec(**name_or_args)
    elif isinstance(name_or_args, str) and name_or_args.lower() in FAMILIES:
        spec = FAMILIES[name_or_args.lower()].preset_spec(model, vocabulary_map)
    elif isinstance(name_or_args, str):
        spec = _parse_spec(name_or_args)
    else:
        raise ValueError(f"--modality: expected a preset name, a spec string or a ModalitySpec, got {name_or_args!r}")
    if vocab_size is not None:
        markers = [i for i in (spec.begin_image, spec.end_image) if i is not None]
        ids = [hi - 1 for _, hi in spec.image_token_ranges] + markers
        if max(ids) >= vocab_size:
            raise ValueError(f"--modality: the spec {spec} names id {max(ids)}, outside the model's vocabulary of "
                             f"{vocab_size} ids")
    return spec


def _parse_spec(text: str) -> ModalitySpec:
    ranges, markers = [], {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            if "=" in item:
                key, value = item.split("=", 1)
                if key not in ("begin", "end") or key in markers:
                    raise ValueError
                markers[key] = int(value)
            else:
                lo, hi = item.split(":")
                ranges.append((int(lo), int(hi)))
        except ValueError:
            raise ValueError(f"--modality {text!r}: cannot read {item!r}; expected a preset "
                             f"({', '.join(FAMILIES)}) or items LO:HI, begin=ID, end=ID") from None
    return ModalitySpec(image_token_ranges=tuple(ranges), begin_image=markers.get("begin"),
                        end_image=markers.get("end"))


# ----------------------------------------------------------------------------- the spec against the data

# A spec's image codes that are fewer or more than this share of the checkpoint's own, in the same data: a warning.
PLAUSIBLE_SHARE = (0.9, 1.1)


def own_spec(model: nn.Module) -> ModalitySpec | None:
    """The image tokens the checkpoint itself names (its family's: Chameleon / Anole codes 4..8195 and their
    markers, Emu3's from its vocabulary_map, Janus's codes after the text vocabulary); None for a model of no
    known family, or whose vocabulary lacks its family's codes (a tiny test model)."""
    family = FAMILIES.get(getattr(hf_model(model).config, "model_type", None))
    if family is None:
        return None
    spec = family.modality_spec(model)
    return spec if max(hi for _, hi in spec.image_token_ranges) <= family.record_vocab_size(model) else None


def _codes(ids: torch.Tensor, spec: ModalitySpec) -> torch.Tensor:
    found = torch.zeros_like(ids, dtype=torch.bool)
    for lo, hi in spec.image_token_ranges:
        found |= (ids >= lo) & (ids < hi)
    return found


def check_image_tokens(sequences: Iterable[torch.Tensor], spec: ModalitySpec, spec_name: str,
                       own: ModalitySpec | None, data: str) -> int:
    """Count the tokens of ``sequences`` (1-D id tensors) that ``spec`` marks as image codes, and refuse a
    spec that marks none where the data holds images: the checkpoint's own image codes (``own``), else image
    spans (the spec's begin markers). Warn when the count is implausible: outside ``PLAUSIBLE_SHARE`` of the
    checkpoint's own codes, or (no ``own``) a tenth or more of the spec's codes outside the image spans (text
    taken for image). ``spec_name`` names the spec as the user gave it, ``data`` the files. Returns the count."""
    total = codes = own_codes = spans = outside = 0
    spans_only = ModalitySpec(begin_image=spec.begin_image, end_image=spec.end_image) if spec.has_markers else None
    for ids in sequences:
        total += ids.numel()
        marked = _codes(ids, spec)
        codes += int(marked.sum())
        if own is not None:
            own_codes += int(_codes(ids, own).sum())
        elif spec.has_markers:
            spans += int((ids == spec.begin_image).sum())
            outside += int((marked & (spans_only.modality_ids(ids) == 0)).sum())
    images = f"{own_codes} of the checkpoint's image codes {list(own.image_token_ranges)}" if own is not None \
        else f"{spans} image span(s) (begin marker {spec.begin_image})"
    if (own_codes or spans) and not codes:
        raise ValueError(f"--modality {spec_name}: marks none of the tokens of {data} as an image code (ranges "
                         f"{list(spec.image_token_ranges)}), though they hold {images}; the spec does not fit the "
                         "data" + (f" (the checkpoint's own: {own})" if own is not None else ""))
    summary = f"{codes} of {total} tokens are image codes of --modality {spec_name}"
    low, high = PLAUSIBLE_SHARE
    if own is not None and not low * own_codes <= codes <= high * own_codes:
        warnings.warn(f"{data}: {summary}, the data holds {images}: an implausible share; is --modality "
                      f"{spec_name} this checkpoint's?", stacklevel=2)
    elif own is None and codes and outside >= 0.1 * codes:
        warnings.warn(f"{data}: {summary}, {outside} of them outside the image spans: an implausible share; do "
                      f"the ranges of --modality {spec_name} take text tokens for image codes?", stacklevel=2)
    return codes
