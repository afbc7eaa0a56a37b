"""MoDE layers through PEFT: get_peft_model builds them, save_pretrained / from_pretrained round-trip."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import config, image_sequence, randomize_adapters, tiny_model

import mode
import mode.peft

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _lora_config():
    return mode.peft.register(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))


@pytest.fixture(scope="module")
def peft_model():
    model = get_peft_model(tiny_model(), _lora_config())
    return mode.attach_routing(model, config())


def test_builds_mode_layers_equal_to_base_at_init(peft_model):
    layers = [m for m in peft_model.modules() if isinstance(m, mode.peft.MoDELoraLinear)]
    assert len(layers) == 6
    assert layers[0].lora_A["default"].shape == (5, 4, 32) and layers[0].scaling["default"] == 2.0
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 18 and all(".lora_" in n for n in trainable)
    ids = image_sequence()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_matches_apply_mode_with_the_same_weights(peft_model):
    randomize_adapters(peft_model)
    ours = mode.apply_mode(tiny_model(), config(rank=4, alpha=8))
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, mode.MoDELinear):
                theirs = peft_model.base_model.model.get_submodule(name)
                layer.lora_A.copy_(theirs.lora_A["default"])
                layer.lora_B.copy_(theirs.lora_B["default"])
                layer.router.copy_(theirs.lora_router["default"])
    ids = image_sequence()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    with mode.teacher_mode(peft_model), torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)


def test_save_pretrained_round_trip(peft_model, tmp_path):
    randomize_adapters(peft_model, seed=7)
    ids = image_sequence()
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path,
                                       config=mode.peft.register(LoraConfig.from_pretrained(tmp_path)))
    mode.attach_routing(loaded, config())
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    spec = mode.MoDEConfig(modality=config().modality).modality
    assert torch.equal(loaded(input_ids=ids, modality_ids=spec.modality_ids(ids)).logits, expected)
    mode.kd_loss(loaded, {"input_ids": ids})  # the PEFT-wrapped model works with the KD loss too


def test_merge_raises_and_peft_hook_missing():
    model = mode.attach_routing(get_peft_model(tiny_model(), _lora_config()), config())
    with pytest.raises(RuntimeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(RuntimeError, match="no _register_custom_module"):
        mode.peft.register(object())
    with pytest.raises(ValueError, match="experts_per_modality"):
        mode.attach_routing(model, config(experts_per_modality=(2, 1)))
