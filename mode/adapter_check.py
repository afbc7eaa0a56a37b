"""What a saved MoDE adapter records about the model it was trained on, and the check that a model fits
it, shared by both loaders (``mode.load_adapter`` and ``peft.PeftModel.from_pretrained``) so that they
refuse the same cases with the same message.

Recorded in adapter_config.json (``mode.MoDEPeftConfig`` fields): ``adapted_modules``, the adapted
modules' names with their [in_features, out_features], and ``vocab_size``, the rows of the model's output
head. An adapter saved before these fields existed has neither, and only the vocabulary check applies.
"""
from __future__ import annotations

import warnings

from torch import nn

from .hf.models import hf_model
from .layer import routed_layers
from .modality import ModalitySpec


def adapted_modules(model: nn.Module, target_modules: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """{name: [in_features, out_features]} of ``model``'s MoDE layers, or, on a model without any, of the
    nn.Linear modules that ``mode.apply_mode`` would adapt for ``target_modules``."""
    layers = routed_layers(model)
    if not layers:
        layers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    return {name: [layer.in_features, layer.out_features] for name, layer in layers}


def vocab_size(model: nn.Module) -> int | None:
    """Rows of ``model``'s output head (the ids it can score), or None without one."""
    get_head = getattr(hf_model(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_adapter_fits(model: nn.Module, modules: dict[str, list[int]], recorded: dict[str, list[int]] | None,
                       recorded_vocab: int | None, spec: ModalitySpec, source: str) -> None:
    """Raise ValueError naming the first module or image-token id where the adapter recorded in ``source``
    does not fit ``model``, whose modules to adapt are ``modules`` (``adapted_modules``)."""
    if recorded is not None:
        names = dict(model.named_modules())
        for name in recorded:
            if name not in modules:
                why = ("its target_modules do not select it" if name in names else "the model has no such module")
                raise ValueError(f"{source}: the adapter holds weights for module {name!r}, which is not adapted "
                                 f"here ({why}; {len(recorded)} modules recorded in adapted_modules)")
        for name in modules:
            if name not in recorded:
                raise ValueError(f"{source}: module {name!r} of the model is a target the adapter holds no weights "
                                 f"for (a deeper model, or target_modules edited?); it was saved for "
                                 f"{len(recorded)} modules")
        for name, shape in modules.items():  # in the model's order
            if list(shape) != list(recorded[name]):
                raise ValueError(f"{source}: module {name!r} has [in, out] features {list(shape)}, the adapter "
                                 f"was saved for {list(recorded[name])}")
    if not spec.image_codes_in_vocab:  # a family whose image codes are not ids of the model's vocabulary
        return
    size = vocab_size(model)
    if size is None:
        return
    outside = [f"{lo}:{hi}" for lo, hi in spec.image_token_ranges if hi > size]
    outside += [f"marker {i}" for i in (spec.begin_image, spec.end_image) if i is not None and i >= size]
    if outside:
        raise ValueError(f"{source}: the adapter's image tokens ({', '.join(outside)}) lie outside the model's "
                         f"vocabulary of {size} ids: an adapter for another model")
    if recorded_vocab is not None and recorded_vocab != size:
        warnings.warn(f"{source}: the adapter was saved on a model with {recorded_vocab} ids, this one has {size}",
                      stacklevel=3)
