"""Cached generation routes every new token by its own id, carrying "inside an image" across steps."""
import copy

import pytest
import torch
from tiny_models import BEGIN_IMAGE, SPEC, config, image_modality, image_sequence, randomize_adapters, tiny_model

import mode


@pytest.fixture(scope="module")
def model():
    return randomize_adapters(mode.apply_mode(tiny_model("llama"), config()))


def _cache_kwarg(model):
    import inspect
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
@pytest.mark.parametrize("kind", ["llama", "chameleon"])
def test_stepwise_cached_logits_equal_full_forward(kind):
    if kind == "chameleon":
        spec = mode.ModalitySpec.chameleon()
        model = randomize_adapters(mode.apply_mode(tiny_model(kind), mode.MoDEConfig(dropout=0.0)))
    else:
        spec, model = SPEC, randomize_adapters(mode.apply_mode(tiny_model(kind), config()))
    seq = image_sequence(spec=spec)
    full = model(input_ids=seq).logits
    # Routing matters here: all-text routing gives other logits.
    as_text = model(input_ids=seq, modality_ids=torch.zeros_like(seq)).logits
    assert (full - as_text).abs().max() > 1e-3

    out = model(input_ids=seq[:, :2], use_cache=True)
    steps, cache = [out.logits], out[1] if not hasattr(out, "cache") else out.cache
    for t in range(2, seq.shape[1]):  # one token per step, crossing <boi> ... <eoi>
        out = model(input_ids=seq[:, t:t + 1], use_cache=True, **{_cache_kwarg(model): cache})
        steps.append(out.logits)
    stepwise = torch.cat(steps, dim=1)
    if kind == "chameleon":  # compare where Chameleon's forward does not pin image-code logits to finfo.min
        keep = full > torch.finfo(full.dtype).min
        stepwise, full = stepwise[keep], full[keep]
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_generate_routes_new_tokens_like_a_full_forward(model):
    prompt = image_sequence()[:, :5]  # ends inside an image: <boi> and two codes
    assert (prompt[:, 3] == BEGIN_IMAGE).all()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = model(input_ids=out.sequences).logits
    generated = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(generated, full[:, prompt.shape[1] - 1:-1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_deepcopied_cache_keeps_image_state(model):
    seq = image_sequence()
    out = model(input_ids=seq[:, :5], use_cache=True)
    cache = copy.deepcopy(out.cache if hasattr(out, "cache") else out[1])
    step = model(input_ids=seq[:, 5:6], use_cache=True, **{_cache_kwarg(model): cache}).logits
    torch.testing.assert_close(step[:, 0], model(input_ids=seq[:, :6]).logits[:, 5], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_from_elsewhere_needs_explicit_modality_ids(model):
    seq = image_sequence()
    out = model(input_ids=seq[:, :5], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out[1]
    delattr(cache, "_mode_inside_image")
    with pytest.raises(ValueError, match="pass modality_ids="):
        model(input_ids=seq[:, 5:6], use_cache=True, **{_cache_kwarg(model): cache})
    step = model(input_ids=seq[:, 5:6], modality_ids=image_modality()[:, 5:6], use_cache=True,
                 **{_cache_kwarg(model): cache}).logits
    torch.testing.assert_close(step[:, 0], model(input_ids=seq[:, :6]).logits[:, 5], rtol=1e-5, atol=1e-5)
