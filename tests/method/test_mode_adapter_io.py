"""save_adapter / load_adapter (PEFT's format, peft_type MODE): round trip into a fresh model, and
clear errors on mismatch."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import SPECS, config, image_sequence, randomize_adapters, tiny_model

import mode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = randomize_adapters(mode.apply_mode(tiny_model(), config()))
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, mode.MoDELinear)):
            layer.router.normal_()
    path = tmp_path_factory.mktemp("adapter")
    mode.save_adapter(model, path)
    return model, path


def test_files_and_keys_per_module(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((path / "adapter_config.json").read_text())
    assert written["peft_type"] == "MODE" and written["experts_per_modality"] == [4, 1] and written["r"] == 8
    tensors = load_file(path / "adapter_model.safetensors")
    layer = model.model.layers[1].mlp.down_proj
    assert len(tensors) == 6 * 3
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    torch.testing.assert_close(tensors[f"{prefix}.mode_A"], layer.lora_A, rtol=0, atol=0)
    torch.testing.assert_close(tensors[f"{prefix}.mode_B"], layer.lora_B, rtol=0, atol=0)
    torch.testing.assert_close(tensors[f"{prefix}.mode_router"], layer.router, rtol=0, atol=0)
    assert tensors[f"{prefix}.mode_router"].shape == (5, 48)


def test_load_into_fresh_model_gives_identical_outputs(saved):
    model, path = saved
    fresh = mode.apply_mode(tiny_model(), config())
    ids = image_sequence()
    assert not torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    mode.load_adapter(fresh, path)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_into_plain_model_applies_mode(saved):
    model, path = saved
    plain = mode.load_adapter(tiny_model(), path)
    assert len([m for m in plain.modules() if isinstance(m, mode.MoDELinear)]) == 6
    ids = image_sequence()
    assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert mode.model.routing_state(plain).config == config()


@pytest.mark.parametrize("overrides, match", [
    (dict(rank=4), "rank is 8, the model's MoDE config has 4"),
    (dict(experts_per_modality=(2, 1)), "experts_per_modality is \\(4, 1\\)"),
    (dict(alpha=8), "alpha is 16"),
    (dict(target_modules=("gate_proj", "up_proj")),
     "weights for module 'model.layers.0.mlp.down_proj', which is not adapted here \\(its target_modules do not"),
    (dict(target_modules=("gate_proj", "up_proj", "down_proj", "q_proj")),
     "module 'model.layers.0.self_attn.q_proj' of the model is a target the adapter holds no weights for"),
])
def test_mismatched_model_raises_naming_it(saved, overrides, match):
    _, path = saved
    with pytest.raises(ValueError, match=match):
        mode.load_adapter(mode.apply_mode(tiny_model(), config(**overrides)), path)


def test_other_shape_raises_naming_the_module(saved):
    _, path = saved
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlp.gate_proj' has \[in, out\] features "
                                         r"\[32, 40\], the adapter was saved for \[32, 48\]"):
        mode.load_adapter(mode.apply_mode(other, config()), path)


def test_not_an_adapter_directory(tmp_path):
    model = mode.apply_mode(tiny_model(), config())
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        mode.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="has no MoDE layers"):
        mode.save_adapter(tiny_model(), tmp_path)


def _single_lora(kind):
    """The trainer's lora baseline on ``kind``: one text expert, an image range past the vocabulary."""
    vocab = tiny_model(kind).get_output_embeddings().weight.shape[0]
    spec = mode.ModalitySpec(image_token_ranges=((vocab, vocab + 1),))
    return randomize_adapters(mode.apply_mode(tiny_model(kind), config(experts_per_modality=(1, 1), modality=spec,
                                                                       rank=4, alpha=12)))


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_single_lora_saves_as_a_plain_peft_lora(kind, tmp_path):
    from peft import LoraConfig, PeftModel

    from mode.adapter_io import save_lora_adapter

    model = _single_lora(kind)
    save_lora_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 12
    assert not {"experts_per_modality", "image_token_ranges"} & written.keys()
    assert all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in load_file(tmp_path /
                                                                                       "adapter_model.safetensors"))
    assert isinstance(LoraConfig.from_pretrained(tmp_path), LoraConfig)
    ids = image_sequence(spec=SPECS[kind])
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_model(kind), tmp_path)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_save_lora_adapter_refuses_a_model_that_is_not_one_lora(tmp_path):
    from mode.adapter_io import save_lora_adapter

    with pytest.raises(ValueError, match="4 text experts, a plain LoRA has one"):
        save_lora_adapter(mode.apply_mode(tiny_model(), config()), tmp_path)
    with pytest.raises(ValueError, match="routes tokens to the image expert"):
        save_lora_adapter(mode.apply_mode(tiny_model(), config(experts_per_modality=(1, 1))), tmp_path)
