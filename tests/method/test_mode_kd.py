"""kd_loss: value against dense logits, masks from labels, gradients, defaults, Chameleon's logit mask."""
import pytest
import torch
from tiny_models import IMAGE_HI, IMAGE_LO, config, image_sequence, randomize_adapters, tiny_model

import mode
from mode.kd import kd_positions


def _naive_kd(model, batch, temperature, lo, hi, topk=None):
    """T^2 KL(teacher || student) over logits[..., lo:hi] / T (the teacher's top k of them, both
    renormalised, with topk), mean over positions t with labels[t+1] != -100."""
    head = model.get_output_embeddings().weight.double()
    with torch.no_grad():
        with mode.teacher_mode(model):
            teacher = model.model(input_ids=batch["input_ids"])[0].double() @ head.T
        student = model.model(input_ids=batch["input_ids"])[0].double() @ head.T
    teacher, student = teacher[:, :-1, lo:hi], student[:, :-1, lo:hi]
    if topk is not None:
        teacher, index = teacher.topk(topk, dim=-1)
        student = student.gather(-1, index)
    log_t = torch.log_softmax(teacher / temperature, -1)
    log_s = torch.log_softmax(student / temperature, -1)
    per_position = temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = batch["labels"][:, 1:] != -100
    return per_position[mask].mean(), per_position * mask


@pytest.fixture(scope="module")
def model():
    return randomize_adapters(mode.apply_mode(tiny_model(), config()), std=0.5)


@pytest.fixture(scope="module")
def batch():
    ids = image_sequence(3, seed=2)
    labels = ids.clone()
    labels[:, :4] = -100  # the caption: no target
    labels[2, 10:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_value_matches_dense_logits_with_config_defaults(model, batch):
    expected, per_position = _naive_kd(model, batch, 2.0, IMAGE_LO, IMAGE_HI)
    assert expected > 1e-4
    torch.testing.assert_close(mode.kd_loss(model, batch).double(), expected, rtol=1e-4, atol=1e-6)
    none = mode.kd_loss(model, batch, reduction="none")
    assert none.shape == (3, 15)
    torch.testing.assert_close(none.double(), per_position, rtol=1e-4, atol=1e-6)


def test_explicit_temperature_and_vocab_range(model, batch):
    expected, _ = _naive_kd(model, batch, 1.0, 0, 64)
    got = mode.kd_loss(model, batch, temperature=1.0, vocab_range=(0, 64))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_given_teacher_topk_skips_the_teacher_and_matches(model, batch, monkeypatch):
    """The teacher's top k computed once (mode.kd_teacher_topk) and given: the same loss and gradients, with
    the tail bucket too, and no teacher forward."""
    top = mode.kd_teacher_topk(model, batch, 5, logsumexp=True)
    assert top.indices.shape == (3, 15, 5)
    calls = []
    for tail in (False, True):
        want = mode.kd_loss(model, batch, topk=5, topk_tail=tail)
        monkeypatch.setattr(mode.kd, "teacher_mode", calls.append)
        got = mode.kd_loss(model, batch, teacher=top, topk_tail=tail)
        monkeypatch.undo()
        assert calls == []
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    expected, _ = _naive_kd(model, batch, 2.0, IMAGE_LO, IMAGE_HI, topk=5)
    torch.testing.assert_close(mode.kd_loss(model, batch, teacher=top).double(), expected, rtol=1e-4, atol=1e-6)


def test_topk_matches_dense_logits(model, batch):
    expected, _ = _naive_kd(model, batch, 2.0, IMAGE_LO, IMAGE_HI, topk=5)
    got = mode.kd_loss(model, batch, topk=5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, mode.kd_loss(model, batch))  # the top-k loss is another loss
    with pytest.raises(ValueError, match="topk"):
        mode.kd_loss(model, batch, topk=IMAGE_HI - IMAGE_LO + 1)


def test_distilled_positions_without_labels():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert kd_positions({"input_ids": ids, "attention_mask": mask}).tolist() == [
        [True, True, False, False], [True, True, True, True]]
    assert kd_positions({"input_ids": ids}).all()


def test_zero_for_fresh_adapters_and_gradients_reach_adapters_only(batch):
    model = mode.apply_mode(tiny_model(), config())
    assert mode.kd_loss(model, batch).abs() < 1e-6
    randomize_adapters(model)
    mode.kd_loss(model, batch).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert model.model.layers[0].mlp.up_proj.lora_A.grad.abs().sum() > 0


def test_chameleon_image_logits_masking_is_bypassed():
    model = randomize_adapters(mode.apply_mode(tiny_model("chameleon"), mode.MoDEConfig(dropout=0.0)), std=0.5)
    spec = mode.ModalitySpec.chameleon()
    ids = torch.tensor([[1, 2, 3, spec.begin_image, 100, 200, 300, 400, spec.end_image]])
    # The CausalLM forward sets every image-code logit to the dtype's minimum: KD on them would be void.
    assert (model(input_ids=ids).logits[..., 4:8196] == torch.finfo(torch.float32).min).all()
    labels = torch.where(torch.arange(9) >= 4, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "labels": labels}
    expected, _ = _naive_kd(model, batch, 2.0, 4, 8196)
    assert expected > 1e-4
    torch.testing.assert_close(mode.kd_loss(model, batch).double(), expected, rtol=1e-4, atol=1e-6)


def test_bad_batch(model):
    with pytest.raises(ValueError, match="expected an 'input_ids' entry"):
        mode.kd_loss(model, {"labels": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="expected a \\[B, T\\] tensor"):
        mode.kd_loss(model, {"input_ids": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="kd_vocab_range: .* 2 image-token ranges"):
        mode.MoDEConfig(modality=mode.ModalitySpec(image_token_ranges=((1, 2), (3, 4)))).resolved_kd_vocab_range()
