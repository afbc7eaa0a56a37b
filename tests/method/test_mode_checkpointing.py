"""Gradient checkpointing of MoDE models: recomputed layers see the routing of their own forward.

A task forward and a KD forward (two routing plans, a teacher pass in between) run before one
backward; with Hugging Face checkpointing (reentrant or not) the adapters' gradients equal those
of the same step without it, for apply_mode and PEFT models.
"""
import pytest
import torch
from tiny_models import config, image_sequence, peft_config, randomize_adapters, tiny_model

import mode

CHAMELEON = mode.ModalitySpec.chameleon()


def _model(kind: str, builder: str, dropout: float):
    spec = CHAMELEON if kind == "chameleon" else config().modality
    if builder == "apply_mode":
        model = mode.apply_mode(tiny_model(kind), config(modality=spec, dropout=dropout))
    else:
        from peft import get_peft_model
        model = get_peft_model(tiny_model(kind), peft_config(spec, lora_dropout=dropout))
    return randomize_adapters(model).train(), spec


def _step_grads(model, spec) -> tuple[dict, int]:
    """Gradients of CE on a task batch + 0.3 KD on a generation batch, and how often one MoDE layer ran."""
    calls = []
    layer = next(m for m in model.modules() if isinstance(m, mode.layer.ModalityRoutedLayer))
    handle = layer.register_forward_hook(lambda *args: calls.append(1))
    task = image_sequence(seed=1, spec=spec)
    gen = image_sequence(batch=3, seed=2, spec=spec)[:, :12]
    torch.manual_seed(0)  # the same dropout masks in both runs
    loss = model(input_ids=task, labels=task).loss + 0.3 * mode.kd_loss(model, {"input_ids": gen})
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, len(calls)


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
@pytest.mark.parametrize("kind, reentrant, dropout", [("llama", False, 0.1), ("llama", True, 0.1),
                                                       ("chameleon", False, 0.0), ("chameleon", True, 0.0)])
def test_gradients_equal_without_checkpointing(kind, builder, reentrant, dropout):
    model, spec = _model(kind, builder, dropout)
    expected, plain_calls = _step_grads(model, spec)
    mode.enable_gradient_checkpointing(model, use_reentrant=reentrant)
    got, checkpointed_calls = _step_grads(model, spec)
    assert checkpointed_calls > plain_calls  # the layers were recomputed in backward
    assert expected.keys() == got.keys() and len(got) == 18
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_hugging_face_enable_after_apply_mode():
    """Enabling through Hugging Face's own method, after the MoDE layers exist, is enough."""
    model, spec = _model("llama", "apply_mode", 0.0)
    expected, _ = _step_grads(model, spec)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got, _ = _step_grads(model, spec)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
