"""PEFT's own generic tests (``TestDecoderModels`` of PEFT 0.22.0's test_decoder_models.py, on its
testing_common.PeftCommonTester) run on a MoDE config: each refusal by design is asserted as a clear error,
every other check that takes a config passes. PEFT's code is not copied here: ``peft_generic`` drives a
pinned copy of its sdist in the user cache; the Hub model id maps to the tiny Llama built offline."""
import inspect

import pytest
import torch
from peft_generic import peft_tests
from tiny_models import SPEC, tiny_model

import mode

MODEL_ID = "peft-internal-testing/tiny-random-LlamaForCausalLM"
CONFIG = dict(task_type="CAUSAL_LM", target_modules=["gate_proj", "up_proj", "down_proj"], r=8, lora_alpha=16,
              lora_dropout=0.0, image_token_ranges=SPEC.image_token_ranges, begin_image=SPEC.begin_image,
              end_image=SPEC.end_image)
ONE_ADAPTER = "MoDE supports one adapter per model"
NO_MERGE = "MoDE adapters cannot be merged"
# PEFT's generic checks that MoDE refuses by design, with the error each raises
REFUSED = {
    "test_add_adapter_no_autocast_adapter_dtype": ONE_ADAPTER,
    "test_delete_adapter": ONE_ADAPTER,
    "test_delete_inactive_adapter": ONE_ADAPTER,
    "test_load_adapter_no_warning": ONE_ADAPTER,  # loads a second adapter beside the first
    "test_merge_layers_multi": ONE_ADAPTER,
    "test_save_pretrained_selected_adapters": ONE_ADAPTER,
    "test_save_pretrained_selected_adapters_pickle": ONE_ADAPTER,
    "test_merge_layers": NO_MERGE,
    "test_merge_layers_fp16": NO_MERGE,
    "test_merge_layers_nan": NO_MERGE,
    # an inputs_embeds-only forward with the adapter on: routing needs modality ids (input_ids or modality_ids=)
    "test_passing_input_embeds_works": "no input_ids to derive them from .* pass modality_ids=",
}
NOT_RUN = {  # loads its model from the Hub itself (not through transformers_class) before its prompt-learning skip
    "test_prompt_learning_with_gradient_checkpointing",
}


class TinyLlama:
    """Stands for AutoModelForCausalLM: every model id is the tiny Llama, built offline."""

    @staticmethod
    def from_pretrained(model_id, *args, torch_dtype=None, dtype=None, **kwargs):
        model = tiny_model("llama")
        model.config._name_or_path = model.name_or_path = model_id
        dtype = dtype or torch_dtype
        return model if dtype in (None, "auto") else model.to(dtype)


def _tester():
    tester = peft_tests("test_decoder_models").TestDecoderModels
    return type("MoDEDecoderModels", (tester,), {"transformers_class": TinyLlama})


def _generic_checks() -> list[str]:
    """Names of PEFT's decoder tests that take a config (the others are specific to one PEFT method)."""
    from peft_generic import fetch_sdist

    try:
        fetch_sdist()
    except BaseException:  # collected anyway; the test itself fails with the fetch command
        return ["test_sdist_is_available"]
    tester = _tester()
    return sorted(name for name in dir(tester) if name.startswith("test_") and name not in NOT_RUN
                  and "config_cls" in inspect.signature(getattr(tester, name)).parameters)


@pytest.mark.parametrize("name", _generic_checks())
def test_peft_generic_check_on_a_mode_config(name, request):
    tester = _tester()
    method = getattr(tester(), name)
    values = {"model_id": MODEL_ID, "config_cls": mode.MoDEPeftConfig, "config_kwargs": dict(CONFIG),
              "dtype": torch.float32, "use_reentrant": False, "adapter_name": "default"}
    args = {p: values[p] if p in values else request.getfixturevalue(p) for p in inspect.signature(method).parameters}
    if name in REFUSED:
        with pytest.raises((ValueError, RuntimeError), match=REFUSED[name]):
            method(**args)
    else:
        method(**args)  # passes, or skips where PEFT's own test says it does not apply to this config
