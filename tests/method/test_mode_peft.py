"""MoDE as a PEFT method: get_peft_model builds MoDE layers, save_pretrained / PeftModel.from_pretrained
round-trip them, one on-disk format with mode.save_adapter / load_adapter, and a process where MoDE
is not registered refuses the adapter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import SPECS, config, image_sequence, peft_config, randomize_adapters, tiny_model

import mode
from mode.peft import MoDEPeftLinear

REPO = Path(__file__).resolve().parents[2]
CHAMELEON = mode.ModalitySpec.chameleon()


def _spec(kind):
    return CHAMELEON if kind == "chameleon" else config().modality


@pytest.fixture(scope="module")
def peft_model():
    return get_peft_model(tiny_model(), peft_config(r=4, lora_alpha=8))


def test_issue_example_config_serialises_flat():
    cfg = mode.MoDEPeftConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["gate_proj", "up_proj",
                              "down_proj"], experts_per_modality=(4, 1), image_token_ranges=((4, 8196),),
                              begin_image=8197, end_image=8196)
    assert cfg.peft_type == "MODE" and cfg.peft_type.value == "MODE"
    assert cfg.mode_config() == mode.MoDEConfig()  # the paper's settings, Chameleon vocabulary
    assert json.loads(json.dumps(cfg.to_dict(), default=list))["image_token_ranges"] == [[4, 8196]]


def test_builds_mode_layers_equal_to_base_at_init(peft_model):
    layers = [m for m in peft_model.modules() if isinstance(m, MoDEPeftLinear)]
    assert len(layers) == 6
    assert layers[0].mode_A["default"].shape == (5, 4, 32) and layers[0].scaling["default"] == 2.0
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 18 and all(n.rsplit(".", 2)[-2] in ("mode_A", "mode_B", "mode_router") for n in trainable)
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
                layer.lora_A.copy_(theirs.mode_A["default"])
                layer.lora_B.copy_(theirs.mode_B["default"])
                layer.router.copy_(theirs.mode_router["default"])
    ids = image_sequence()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    with mode.teacher_mode(peft_model), torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)


def _train_step(model, spec):
    model.train()
    ids = image_sequence(seed=3, spec=spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss + 0.3 * mode.kd_loss(model, {"input_ids": ids})
    loss.backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "chameleon"])
def test_train_save_pretrained_from_pretrained_identical(kind, tmp_path):
    spec = _spec(kind)
    model = _train_step(get_peft_model(tiny_model(kind), peft_config(spec, lora_dropout=0.05)), spec)
    ids = image_sequence(seed=4, spec=spec)
    expected = model(input_ids=ids).logits
    assert not torch.equal(expected, tiny_model(kind)(input_ids=ids).logits)  # the step changed the model
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MODE" and saved["experts_per_modality"] == [4, 1]
    assert saved["begin_image"] == spec.begin_image
    assert saved["image_token_ranges"] == [list(spec.image_token_ranges[0])]

    loaded = PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert torch.equal(loaded(input_ids=ids, modality_ids=spec.modality_ids(ids)).logits, expected)
    # One format: mode.load_adapter applies MoDE to a plain model from the same directory.
    plain = mode.load_adapter(tiny_model(kind), tmp_path)
    assert torch.equal(plain(input_ids=ids).logits, expected)
    mode.kd_loss(loaded, {"input_ids": ids})  # the loaded PEFT model distils as well


def test_save_adapter_of_apply_mode_model_loads_in_peft(tmp_path):
    model = randomize_adapters(mode.apply_mode(tiny_model(), config()))
    mode.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = image_sequence()
    for low_cpu_mem_usage in (True, False):  # PEFT's two loading paths (adapters built on meta, or not)
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # and PEFT's save_pretrained writes the same tensors under the same keys
    loaded.save_pretrained(tmp_path / "again")
    ours, theirs = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" /
                                                                                  "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unregistered_process_refuses_the_adapter(peft_model, tmp_path):
    """Without `import mode`, PEFT does not know peft_type MODE: loading raises instead of building LoRA."""
    from mode.adapter_io import save_lora_adapter

    peft_model.save_pretrained(tmp_path)
    # and the trainer's single-LoRA baselines, saved as plain LoRA, load with PEFT alone
    lora = randomize_adapters(mode.apply_mode(tiny_model(), config(
        experts_per_modality=(1, 1), modality=mode.ModalitySpec(image_token_ranges=((64, 65),)))))
    save_lora_adapter(lora, tmp_path / "lora")
    ids = image_sequence()
    script = f"""
import sys, torch
from peft import LoraConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
assert "mode" not in sys.modules
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
path = {str(tmp_path)!r}
for load in (lambda: PeftModel.from_pretrained(base, path), lambda: LoraConfig.from_pretrained(path)):
    try:
        load()
    except KeyError as exc:
        print("refused", exc)
    else:
        print("loaded")
lora = PeftModel.from_pretrained(base, path + "/lora").eval()
with torch.no_grad():
    torch.save(lora(input_ids=torch.tensor({ids.tolist()})).logits, path + "/lora_logits.pt")
assert "mode" not in sys.modules
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["refused 'MODE'", "refused 'MODE'"], run.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "lora_logits.pt"), lora(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_registered_when_peft_is_imported_after_mode():
    script = "import mode, sys; assert 'peft' not in sys.modules; from peft import PeftConfig, PeftType; " \
             "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; print(m[PeftType.MODE].__name__)"
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0 and run.stdout.strip() == "MoDEPeftConfig", run.stderr[-2000:]


def test_merge_second_adapter_and_bad_config_raise(peft_model):
    with pytest.raises(RuntimeError, match="cannot be merged"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="one adapter per model"):
        peft_model.add_adapter("other", peft_config(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="experts_per_modality"):
        peft_config(experts_per_modality=(2, 1, 1))
    with pytest.raises(ValueError, match="begin_image and end_image"):
        peft_config(begin_image=None)


def test_load_adapter_refuses_another_peft_method(tmp_path):
    from peft import LoraConfig
    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_type is 'LORA', not a MoDE adapter"):
        mode.load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_routing_hooks_follow_the_adapters(kind):
    """A forward in which no MoDE adapter runs (disable_adapter, teacher mode, deleted adapter, unload)
    needs no modality ids, with input_ids or inputs_embeds; unload and delete_adapter remove the hooks."""
    from mode.model import _HOOKS_ATTR

    spec, base = SPECS[kind], tiny_model(kind)
    ids = image_sequence(spec=spec)
    inputs = [{"input_ids": ids}, {"inputs_embeds": base.get_input_embeddings()(ids)}]
    expected = [base(**x).logits for x in inputs]

    def is_base(model):
        with torch.no_grad():
            return all(torch.equal(model(**x).logits, want) for x, want in zip(inputs, expected))

    model = randomize_adapters(get_peft_model(tiny_model(kind), peft_config(spec)))
    with pytest.raises(ValueError, match="no modality ids"):  # an adapter runs: it needs them
        model(**inputs[1])
    with model.disable_adapter():
        assert is_base(model)
    with mode.teacher_mode(model):
        assert is_base(model)
    model.delete_adapter("default")  # PeftModel's own forward then needs an adapter: the model inside it
    inner = model.base_model.model  # (get_base_model() as well)
    assert is_base(inner) and _HOOKS_ATTR not in inner.__dict__

    plain = randomize_adapters(get_peft_model(tiny_model(kind), peft_config(spec))).unload()
    assert not any(isinstance(m, MoDEPeftLinear) for m in plain.modules()) and _HOOKS_ATTR not in plain.__dict__
    assert is_base(plain)
