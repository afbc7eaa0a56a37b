"""Adapters in float32 on a bfloat16 base (PEFT's default), the base's dtype on request, and the op
called with the base's activations and weight in their own dtype (the base GEMM is not upcast)."""
import pytest
import torch
from peft import get_peft_model
from tiny_models import config, image_sequence, peft_config, randomize_adapters, tiny_model

import mode
import mode.layer


def _bf16_model(builder: str, autocast: bool):
    base = tiny_model().to(torch.bfloat16)
    if builder == "apply_mode":
        return mode.apply_mode(base, config(autocast_adapter_dtype=autocast))
    return get_peft_model(base, peft_config(), autocast_adapter_dtype=autocast)


def _adapter_dtypes(model) -> set:
    adapters = [p for p in model.parameters() if p.requires_grad]  # only the adapters are trainable
    assert len(adapters) == 18
    return {p.dtype for p in adapters}


@pytest.fixture
def op_calls(monkeypatch):
    """(x, weight, lora_a) dtypes of every call of the routed-LoRA op from a MoDE layer."""
    calls, op = [], mode.layer.mk.modality_lora_linear

    def spy(x, weight, bias, modality, lora_a, *args, **kwargs):
        calls.append((x.dtype, weight.dtype, lora_a.dtype))
        return op(x, weight, bias, modality, lora_a, *args, **kwargs)

    monkeypatch.setattr(mode.layer.mk, "modality_lora_linear", spy)
    return calls


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
def test_float32_adapters_on_bf16_base_train(builder, op_calls):
    model = randomize_adapters(_bf16_model(builder, autocast=True)).train()
    assert _adapter_dtypes(model) == {torch.float32}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    ids = image_sequence()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert op_calls and set(op_calls) == {(torch.bfloat16, torch.bfloat16, torch.float32)}
    (out.loss + 0.3 * mode.kd_loss(model, {"input_ids": ids})).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 18 and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
def test_flag_keeps_adapters_in_base_dtype(builder, op_calls):
    model = _bf16_model(builder, autocast=False)
    assert _adapter_dtypes(model) == {torch.bfloat16}
    model(input_ids=image_sequence())
    assert set(op_calls) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16)}


def test_float32_adapters_track_the_float32_model():
    """Same adapter values on a bf16 base and on the float32 model: outputs agree to bf16 precision."""
    reference = randomize_adapters(mode.apply_mode(tiny_model(), config()))
    mixed = mode.apply_mode(tiny_model().to(torch.bfloat16), config())
    mixed.load_state_dict(reference.state_dict())  # base weights rounded to bf16, adapters as they are
    assert _adapter_dtypes(mixed) == {torch.float32}
    ids = image_sequence()
    torch.testing.assert_close(mixed(input_ids=ids).logits.float(), reference(input_ids=ids).logits,
                               rtol=0.05, atol=0.05)


def test_adapter_dtype_rule():
    assert mode.layer.adapter_dtype(torch.float16) == torch.float32
    assert mode.layer.adapter_dtype(torch.bfloat16, autocast_adapter_dtype=False) == torch.bfloat16
    assert mode.layer.adapter_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="autocast_adapter_dtype"):
        config(autocast_adapter_dtype="yes")
