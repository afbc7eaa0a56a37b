"""What MoDE needs to know about a Hugging Face decoder, in one place: the model inside a PEFT
wrapper, its decoder stack, the keyword its KV cache travels under, and one cached decode loop.

The decode loop calls the decoder and the output head directly (as ``mode.kd_loss`` does):
Chameleon's CausalLM forward sets the logits of image codes to the most negative float, which
would forbid drawing images.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper, or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack that returns final hidden states (``model.model`` of a CausalLM)."""
    host = hf_model(model)
    get_decoder = getattr(host, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, nn.Module):
        raise ValueError(f"{type(host).__name__} has no decoder (get_decoder()); MoDE needs a Hugging Face "
                         "decoder model such as LlamaForCausalLM")
    return decoder


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameters."""
    return next(model.parameters()).device


# transformers >= 5.2x passes the KV cache as `cache`; earlier releases as `past_key_values`.
_CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_in(outputs_or_kwargs: Any) -> Any:
    """The KV cache in a forward's keyword arguments (a mapping) or in its output, or None."""
    for keyword in _CACHE_KEYWORDS:
        if isinstance(outputs_or_kwargs, Mapping):
            cache = outputs_or_kwargs.get(keyword)
        else:
            cache = getattr(outputs_or_kwargs, keyword, None)
        if cache is not None:
            return cache
    return None


def cache_keyword(module: nn.Module) -> str:
    """The keyword ``module``'s forward takes its KV cache under."""
    parameters = inspect.signature(type(module).forward).parameters
    return next((k for k in _CACHE_KEYWORDS if k in parameters), _CACHE_KEYWORDS[-1])


@torch.no_grad()
def prefill(model: nn.Module, prompts: Tensor) -> Any:
    """The decoder's output on equal-length prompts [B, L], with their KV cache: what `continue_sequences`
    starts from, computed once when the same prompts are also scored (``scoring.continuation_nll``)."""
    return decoder_of(model)(input_ids=prompts.to(model_device(model)), use_cache=True)


@torch.no_grad()
def continue_sequences(model: nn.Module, prompts: Tensor, steps: int, choose: Callable[[Tensor], Tensor],
                       eos_id: int | None = None, prefilled: Any = None) -> Tensor:
    """Extend equal-length prompts [B, L] by up to ``steps`` tokens with a KV cache -> new tokens [B, n].

    ``choose`` maps the float32 next-token logits [B, vocab] to the next tokens [B]. With ``eos_id``,
    a row that emitted it keeps emitting it and decoding stops once every row has (n <= steps).
    ``prefilled``: `prefill` of these prompts, so they are not run again (its KV cache is extended).
    MoDE layers route every new token by its own id (an image code goes to the image expert).
    """
    decoder, head = decoder_of(model), hf_model(model).get_output_embeddings()
    keyword, device = cache_keyword(decoder), model_device(model)
    out = prefill(model, prompts) if prefilled is None else prefilled
    tokens = []
    done = None if eos_id is None else torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(steps):
        token = choose(head(out.last_hidden_state[:, -1]).float())
        if done is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        tokens.append(token)
        if step + 1 == steps or (done is not None and bool(done.all())):
            break
        out = decoder(input_ids=token[:, None], use_cache=True, **{keyword: cache_in(out)})
    return torch.stack(tokens, dim=1)
