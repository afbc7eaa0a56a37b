"""Strict adapter loading: a MoDE adapter loaded onto a model it does not fit raises, naming the module or
the image-token ids, through both loaders (``peft.PeftModel.from_pretrained`` and ``mode.load_adapter``),
on tiny Chameleon and Emu3 checkpoints; a config file that does not parse raises naming the file."""
import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import SPECS, image_sequence, peft_config, tiny_model

import mode

KINDS = ["chameleon", "emu3"]
LOADERS = {"peft": lambda base, path: PeftModel.from_pretrained(base, path), "mode": mode.load_adapter}
DEEPER = {"num_hidden_layers": 3}


def _layer(kind, index, projection="gate_proj"):
    return f"model.{'text_model.' if kind == 'emu3' else ''}layers.{index}.mlp.{projection}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{(kind, sizes): adapter directory} of a 2- and a 3-layer model of each kind (B random)."""
    saved = {}
    for kind in KINDS:
        for sizes in ((), tuple(DEEPER.items())):
            path = tmp_path_factory.mktemp(f"{kind}{len(sizes)}")
            get_peft_model(tiny_model(kind, **dict(sizes)), peft_config(SPECS[kind], init_lora_weights=False)
                           ).save_pretrained(path)
            saved[kind, sizes] = path
    return saved


def _edited(path, tmp_path, **fields):
    copy = shutil.copytree(path, tmp_path / "edited")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return copy


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_loads_onto_its_own_model_and_records_what_it_was_built_on(adapters, kind, loader):
    path = adapters[kind, ()]
    saved = json.loads((path / "adapter_config.json").read_text())
    assert len(saved["adapted_modules"]) == 6 and saved["adapted_modules"][_layer(kind, 1)] == [32, 48]
    assert saved["vocab_size"] == tiny_model(kind).get_output_embeddings().weight.shape[0]
    ids = image_sequence(spec=SPECS[kind])
    with torch.no_grad():
        assert not torch.equal(LOADERS[loader](tiny_model(kind), path)(input_ids=ids).logits,
                               tiny_model(kind)(input_ids=ids).logits)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_deeper_model_raises_naming_the_module_without_weights(adapters, kind, loader):
    with pytest.raises(ValueError, match=f"module '{_layer(kind, 2)}' of the model is a target the adapter holds no "
                                         "weights for"):
        LOADERS[loader](tiny_model(kind, **DEEPER), adapters[kind, ()])


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_shallower_model_raises_naming_the_missing_module(adapters, kind, loader):
    with pytest.raises(ValueError, match=f"weights for module '{_layer(kind, 2, '[a-z]+_proj')}', which is not "
                                         r"adapted here \(the model has no such module"):
        LOADERS[loader](tiny_model(kind), adapters[kind, tuple(DEEPER.items())])


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_edited_target_modules_raise_naming_the_unselected_module(adapters, kind, loader, tmp_path):
    path = _edited(adapters[kind, ()], tmp_path, target_modules=["gate_proj", "up_proj"])
    with pytest.raises(ValueError, match=f"weights for module '{_layer(kind, 0, 'down_proj')}', which is not adapted "
                                         r"here \(its target_modules do not select it"):
        LOADERS[loader](tiny_model(kind), path)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_other_widths_raise_naming_the_module(adapters, kind, loader):
    with pytest.raises(ValueError, match=f"module '{_layer(kind, 0)}' has \\[in, out\\] features \\[32, 40\\], "
                                         r"the adapter was saved for \[32, 48\]"):
        LOADERS[loader](tiny_model(kind, intermediate_size=40), adapters[kind, ()])


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_vocabulary_without_the_image_tokens_raises_naming_them(adapters, kind, loader):
    (lo, hi), = SPECS[kind].image_token_ranges
    small = tiny_model(kind)
    small.resize_token_embeddings(lo + 2)  # the text ids and two codes
    with pytest.raises(ValueError, match=f"the adapter's image tokens \\({lo}:{hi}[^)]*\\) lie outside the "
                                         f"model's vocabulary of {lo + 2} ids"):
        LOADERS[loader](small, adapters[kind, ()])
    if kind == "chameleon":  # the case: a Chameleon adapter onto a 64-id Llama of the same widths
        with pytest.raises(ValueError, match="lie outside the model's vocabulary of 64 ids"):
            LOADERS[loader](tiny_model("llama"), adapters[kind, ()])


@pytest.mark.parametrize("loader", LOADERS)
def test_a_family_whose_image_codes_are_apart_skips_the_vocabulary_check(adapters, loader, tmp_path):
    path = _edited(adapters["chameleon", ()], tmp_path, image_codes_in_vocab=False)
    model = LOADERS[loader](tiny_model("llama"), path)  # same module names and widths: it loads
    assert mode.model.routing_state(model).config.modality.image_codes_in_vocab is False


@pytest.mark.parametrize("kind", KINDS)
def test_peft_type_edited_to_lora_runs_none_of_modes_code(adapters, kind, tmp_path):
    """PEFT then builds LoRA from the file, and by default only warns that the weights do not match
    (documented); strict_adapter_check="error" raises; mode.load_adapter refuses it."""
    path = _edited(adapters[kind, ()], tmp_path, peft_type="LORA")
    with pytest.raises(ValueError, match="peft_type is 'LORA', not a MoDE adapter"):
        mode.load_adapter(tiny_model(kind), path)
    with pytest.raises(RuntimeError, match="unexpected adapter keys: .*mode_A"):
        PeftModel.from_pretrained(tiny_model(kind), path, strict_adapter_check="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_model(kind), path)
    assert any("mode_A" in str(w.message) for w in caught)


@pytest.mark.parametrize("loader", LOADERS)
def test_config_that_does_not_parse_raises_naming_the_file(adapters, loader, tmp_path):
    path = shutil.copytree(adapters["chameleon", ()], tmp_path / "broken")
    (path / "adapter_config.json").write_text('{"peft_type": "MODE",\n  "r": }')
    with pytest.raises(ValueError, match=f"{path / 'adapter_config.json'}: not valid JSON: .*line 2"):
        LOADERS[loader](tiny_model("chameleon"), path)
