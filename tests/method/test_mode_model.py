"""apply_mode on tiny Llama, Qwen2 and Chameleon decoders: routing per forward, teacher mode,
trainable parameters, bad input, and a short training run."""
import pytest
import torch
from tiny_models import IMAGE_LO, config, image_modality, image_sequence, randomize_adapters, tiny_model

import mode
import mode_kernels as mk
from mode.layer import MoDELinear

KINDS = ["llama", "qwen2", "chameleon"]
ADAPTER_PARAMS = ("lora_A", "lora_B", "router")


def _config_for(kind, **overrides):
    if kind == "chameleon":
        return mode.MoDEConfig(dropout=0.0, **overrides)  # default spec: the Chameleon/Anole preset
    return config(**overrides)


def _ids_for(kind):
    if kind != "chameleon":
        return image_sequence()
    spec = mode.ModalitySpec.chameleon()
    return torch.tensor([[1, 5000, spec.begin_image, 4, 8195, 30, spec.end_image, 9],
                         [spec.begin_image, 100, 8000, 8197, 7, 8196, 8198, 3]])


@pytest.mark.parametrize("kind", KINDS)
def test_apply_mode_replaces_targets_freezes_base_and_keeps_outputs(kind):
    model = tiny_model(kind)
    ids = _ids_for(kind)
    before = model(input_ids=ids).logits
    assert mode.apply_mode(model, _config_for(kind)) is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoDELinear)}
    assert len(layers) == 3 * 2 and all(n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for n in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ADAPTER_PARAMS for n in trainable)
    assert len(trainable) == 3 * len(layers)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)

    randomize_adapters(model)
    student = model(input_ids=ids).logits
    assert (student - before).abs().max() > 1e-3
    with mode.teacher_mode(model):
        assert torch.equal(model(input_ids=ids).logits, before)  # bit-identical: no adapter compute
    assert torch.equal(model(input_ids=ids).logits, student)  # restored after the block


@pytest.mark.parametrize("kind", KINDS)
def test_derived_modality_equals_explicit_and_routing_matters(kind):
    model = randomize_adapters(mode.apply_mode(tiny_model(kind), _config_for(kind)))
    ids = _ids_for(kind)
    spec = model.model.layers[0].mlp.gate_proj.routing.config.modality
    derived = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids, modality_ids=spec.modality_ids(ids)).logits, derived)
    assert not torch.allclose(model(input_ids=ids, modality_ids=torch.zeros_like(ids)).logits, derived)


def test_one_routing_plan_per_forward_shared_by_all_layers(monkeypatch):
    model = randomize_adapters(mode.apply_mode(tiny_model(), config()))
    plans, layer_modalities = [], []
    real_plan, real_op = mk.plan_routing, mk.modality_lora_linear

    def counting_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    def recording_op(x, weight, bias, modality, *args, **kwargs):
        layer_modalities.append(modality)
        return real_op(x, weight, bias, modality, *args, **kwargs)

    monkeypatch.setattr(mk, "plan_routing", counting_plan)
    monkeypatch.setattr(mk, "modality_lora_linear", recording_op)
    model(input_ids=image_sequence())
    assert len(plans) == 1 and len(layer_modalities) == 6
    assert all(m is plans[0] for m in layer_modalities)
    assert torch.equal(plans[0].counts(), image_modality().reshape(-1).bincount(minlength=2))
    model.model(input_ids=image_sequence())  # a direct decoder call plans its own routing too
    assert len(plans) == 2


def test_modality_ids_explicit_with_inputs_embeds():
    model = randomize_adapters(mode.apply_mode(tiny_model(), config()))
    ids = image_sequence()
    embeds = model.get_input_embeddings()(ids)
    expected = model(input_ids=ids).logits
    got = model(inputs_embeds=embeds, modality_ids=image_modality()).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with mode.teacher_mode(model):  # the teacher needs no modality ids
        model(inputs_embeds=embeds)


def test_bad_modality_ids_and_missing_ids():
    model = mode.apply_mode(tiny_model(), config())
    ids = image_sequence()
    with pytest.raises(ValueError, match=r"modality_ids: expected shape \[2, 16\]"):
        model(input_ids=ids, modality_ids=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"modality_ids: .*must lie in \[0, 2\)"):
        model(input_ids=ids, modality_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="modality_ids: .*integer dtype"):
        model(input_ids=ids, modality_ids=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="no input_ids to derive them from .*pass modality_ids="):
        model(inputs_embeds=model.get_input_embeddings()(ids))
    model(input_ids=ids)  # the failures left no stale state behind


def test_bad_config():
    with pytest.raises(ValueError, match=r"no module named \['o_proj_typo'\].*gate_proj"):
        mode.apply_mode(tiny_model(), config(target_modules=("gate_proj", "o_proj_typo")))
    with pytest.raises(ValueError, match="model.layers.0.mlp is a LlamaMLP, MoDE adapts nn.Linear only"):
        mode.apply_mode(tiny_model(), config(target_modules=("mlp",)))
    model = mode.apply_mode(tiny_model(), config())
    with pytest.raises(ValueError, match="already has MoDE layers"):
        mode.apply_mode(model, config())
    with pytest.raises(ValueError, match="experts_per_modality"):
        config(experts_per_modality=(4, 1, 1))
    with pytest.raises(ValueError, match="has no MoDE layers"):
        with mode.teacher_mode(tiny_model()):
            pass


def test_layer_called_outside_a_forward_raises_clearly():
    """(Gradient checkpointing is covered in test_mode_checkpointing.py.)"""
    model = mode.apply_mode(tiny_model(), config())
    model(input_ids=image_sequence())
    with pytest.raises(ValueError, match="no modality ids for this forward: it was called outside a forward"):
        model.model.layers[0].mlp.gate_proj(torch.randn(2, 16, 32))


def test_attention_targets_and_other_expert_counts():
    model = mode.apply_mode(tiny_model(), config(target_modules=("q_proj", "v_proj"), experts_per_modality=(2, 3),
                                                 rank=2))
    layer = model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, MoDELinear) and layer.lora_A.shape == (5, 2, 32)
    randomize_adapters(model)
    assert model(input_ids=image_sequence()).logits.isfinite().all()


def test_twenty_training_steps_lower_the_loss_and_change_only_adapters():
    torch.manual_seed(0)
    model = mode.apply_mode(tiny_model(), config(dropout=0.05)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Understanding-style batch (image, then answer) and a generation-stream batch for KD.
    ids = torch.cat([image_sequence(4, seed=3), torch.randint(0, IMAGE_LO, (4, 4))], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    gen = image_sequence(4, seed=4)
    gen_labels = torch.where(torch.arange(16) >= 4, gen, torch.full_like(gen, -100))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        ce = model(input_ids=ids, labels=labels).loss
        kd = mode.kd_loss(model, {"input_ids": gen, "labels": gen_labels})
        loss = ce + 0.3 * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:10]), losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n
    assert any("router" in n for n in adapters)
