"""MoDE on Janus (a tiny one built offline): adapters on the language model's MLPs only; placeholder
and generated-code positions routed to the image expert, with and without a KV cache; the teacher
is the base model bit for bit; KD on the generation head (with its bias) equals the dense gold."""
import pytest
import torch
from naive import kd_kl
from tiny_models import JANUS_IMAGE_SIZE, JANUS_IMAGE_TOKENS, JANUS_VOCAB, randomize_adapters, tiny_model

import mode
from mode.families import family_of
from mode.modality import IMAGE, TEXT

TEXT_VOCAB = len(JANUS_VOCAB)
PLACEHOLDER = JANUS_VOCAB["<image_placeholder>"]


@pytest.fixture(scope="module")
def janus():
    base = tiny_model("janus")
    config = mode.MoDEConfig(modality=family_of(base).modality_spec(base), dropout=0.0)
    return base, randomize_adapters(mode.apply_mode(tiny_model("janus"), config), std=0.5)


def understanding_batch():
    """[2, 12]: bos, <boi>, 4 placeholders, <eoi>, a question and an answer; 16x16 pixels."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(7, TEXT_VOCAB, (2, 5), generator=gen)
    image = torch.tensor([5] + [PLACEHOLDER] * JANUS_IMAGE_TOKENS + [6]).expand(2, -1)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), image, words], dim=1)
    return ids, torch.randn(2, 3, JANUS_IMAGE_SIZE, JANUS_IMAGE_SIZE, generator=gen)


def stream_ids():
    """[2, 9]: a caption, <boi>, then 5 image codes numbered after the text vocabulary."""
    gen = torch.Generator().manual_seed(1)
    caption = torch.randint(7, TEXT_VOCAB, (2, 3), generator=gen)
    codes = TEXT_VOCAB + torch.randint(0, 16, (2, 5), generator=gen)
    return torch.cat([caption, torch.full((2, 1), 5), codes], dim=1)


def test_adapters_sit_on_the_language_models_mlps_only(janus):
    _, model = janus
    adapted = sorted({name for name, module in model.named_modules() if isinstance(module, mode.MoDELinear)})
    assert adapted and all(name.startswith("model.language_model.layers.") and ".mlp." in name for name in adapted)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp." in name and "language_model" in name for name in trainable)


def test_placeholders_and_codes_route_to_the_image_expert(janus):
    _, model = janus
    ids, pixels = understanding_batch()
    expected = (ids == PLACEHOLDER).long()
    with torch.no_grad():
        derived = model(input_ids=ids, pixel_values=pixels).logits
        given = model(input_ids=ids, pixel_values=pixels, modality_ids=expected).logits
        as_text = model(input_ids=ids, pixel_values=pixels, modality_ids=torch.zeros_like(ids)).logits
    assert torch.equal(derived, given) and not torch.allclose(derived, as_text)

    family, stream = family_of(model), stream_ids()
    inputs = family.stream_inputs(model, stream)
    assert inputs["modality_ids"].tolist() == [[TEXT] * 4 + [IMAGE] * 5] * 2
    decoder = model.get_decoder()
    with pytest.raises(ValueError, match="no modality ids"):  # embeddings only: the ids must be given
        decoder(inputs_embeds=inputs["inputs_embeds"])


def test_teacher_mode_is_the_base_model_bit_for_bit(janus):
    base, model = janus
    ids, pixels = understanding_batch()
    stream = family_of(model).stream_inputs(model, stream_ids())
    with torch.no_grad(), mode.teacher_mode(model):
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           base(input_ids=ids, pixel_values=pixels).logits)
        embeds = stream["inputs_embeds"]
        assert torch.equal(model.get_decoder()(inputs_embeds=embeds).last_hidden_state,
                           base.get_decoder()(inputs_embeds=embeds).last_hidden_state)


def test_cached_decoding_equals_the_full_forward(janus):
    _, model = janus
    ids, pixels = understanding_batch()
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels).logits
        out = model(input_ids=ids[:, :8], pixel_values=pixels, use_cache=True)  # the image and a word
        steps = [out.logits]
        for t in range(8, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

        # the generation stream, one code at a time with its modality given per step
        decoder, stream = model.get_decoder(), family_of(model).stream_inputs(model, stream_ids())
        embeds, modality = stream["inputs_embeds"], stream["modality_ids"]
        full = decoder(inputs_embeds=embeds, modality_ids=modality).last_hidden_state
        out = decoder(inputs_embeds=embeds[:, :4], modality_ids=modality[:, :4], use_cache=True)
        steps = [out.last_hidden_state]
        for t in range(4, embeds.shape[1]):
            out = decoder(inputs_embeds=embeds[:, t:t + 1], modality_ids=modality[:, t:t + 1], cache=out.cache,
                          use_cache=True)
            steps.append(out.last_hidden_state)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_kd_on_the_generation_head_equals_the_dense_gold(janus, topk):
    _, model = janus
    ids = stream_ids()
    labels = ids.masked_fill(ids < TEXT_VOCAB, -100)  # the codes are scored
    batch = {"input_ids": ids, "labels": labels}
    head, decoder = model.model.generation_head, model.get_decoder()
    inputs = family_of(model).stream_inputs(model, ids)
    assert head.vision_head.bias.abs().sum() > 0
    with torch.no_grad():
        with mode.teacher_mode(model):
            teacher = head(decoder(**inputs)[0])[:, :-1].double()
        student = head(decoder(**inputs)[0])[:, :-1].double()
    gold = kd_kl(student, teacher, temperature=2.0, mask=labels[:, 1:] != -100, topk=topk)
    loss = mode.kd_loss(model, batch, topk=topk)
    torch.testing.assert_close(loss.double(), gold, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
