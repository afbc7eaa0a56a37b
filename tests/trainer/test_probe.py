"""mode.train.probe: cosine between task and generation gradients per adapter group."""
import pytest
import torch
from tiny_models import IMAGE_HI, IMAGE_LO, SPEC, config, image_sequence, randomize_adapters, tiny_model

import mode
from mode.constants import IGNORE_INDEX
from mode.train import probe
from mode.train.probe import adapter_groups, conflict_cosines, plot_conflict


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_adapters(mode.apply_mode(tiny_model("llama"), config()))


def image_labels(ids):
    """Labels scoring the image tokens of ``ids`` only."""
    return torch.where(SPEC.modality_ids(ids) == 1, ids, torch.full_like(ids, IGNORE_INDEX))


def test_identical_losses_have_cosine_one(model):
    ids = image_sequence(2)
    batch = {"input_ids": ids, "labels": image_labels(ids)}  # task loss == generation loss
    cos = conflict_cosines(model, batch, batch)
    assert set(cos) == {"text_experts", "image_expert", "total"}
    for group, value in cos.items():
        assert value == pytest.approx(1.0, abs=1e-9), group


def test_disjoint_modalities_do_not_interfere(model):
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(0, IMAGE_LO, (2, 12), generator=gen)
    image = torch.randint(IMAGE_LO, IMAGE_HI, (2, 12), generator=gen)
    task_batch = {"input_ids": text, "labels": text}
    generation_batch = {"input_ids": image, "labels": image}
    # The text experts see no token of the generation batch, the image expert none of the task
    # batch: zero gradients there, so cosine 0 by definition; the total is 0 because the two
    # gradients live on disjoint rows.
    cos = conflict_cosines(model, task_batch, generation_batch)
    assert cos == {"text_experts": 0.0, "image_expert": 0.0, "total": 0.0}

    lora_b = model.model.layers[0].mlp.up_proj.lora_B
    task_grad = torch.autograd.grad(probe.task_loss(model, task_batch), [lora_b])[0]
    assert task_grad[-1].abs().max() == 0 and task_grad[:-1].abs().max() > 0  # image expert row: no task gradient


def test_mixed_batches_give_a_cosine_in_range(model):
    ids = image_sequence(2)
    task_batch = {"input_ids": ids, "labels": torch.where(SPEC.modality_ids(ids) == 0, ids, IGNORE_INDEX)}
    cos = conflict_cosines(model, task_batch, {"input_ids": image_sequence(2, seed=1)})
    assert all(-1.0 <= v <= 1.0 for v in cos.values()) and cos["text_experts"] != 0.0 and cos["image_expert"] != 0.0


def test_probe_leaves_grads_and_modes_alone(model):
    model.train()
    model.model.layers[1].eval()
    param = model.model.layers[0].mlp.gate_proj.lora_A
    param.grad = torch.full_like(param, 7.0)
    ids = image_sequence(2)
    rng = torch.random.get_rng_state()
    conflict_cosines(model, {"input_ids": ids}, {"input_ids": ids})
    assert torch.equal(param.grad, torch.full_like(param, 7.0))
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training
    assert torch.equal(torch.random.get_rng_state(), rng)
    other = model.model.layers[0].mlp.up_proj.lora_A
    assert other.grad is None


def test_groups_of_mode_layers(model):
    groups = adapter_groups(model)
    assert set(groups) == {"text_experts", "image_expert"}
    assert all(rows == slice(4, 5) for _, rows in groups["image_expert"])
    assert all(rows == slice(0, 4) for _, rows in groups["text_experts"])
    assert len(groups["text_experts"]) == 2 * 3 * 3  # 2 layers x 3 projections x (lora_A, lora_B, router)


def test_text_only_routing_as_the_trainer_builds_lora():
    """lora / moelora in mode.train: a spec matching no token routes everything as text; the
    idle image expert is left out, and shared=True names the one group "shared"."""
    no_image = mode.ModalitySpec(image_token_ranges=((64, 65),))
    torch.manual_seed(0)
    lora = randomize_adapters(mode.apply_mode(tiny_model("llama"), config(modality=no_image,
                                                                          experts_per_modality=(1, 1))))
    ids = image_sequence(2)
    task, generation = {"input_ids": ids, "labels": torch.where(ids < 40, ids, IGNORE_INDEX)}, {"input_ids": ids}
    cos = conflict_cosines(lora, task, generation, spec=SPEC)
    assert set(cos) == {"text_experts", "total"}
    shared = conflict_cosines(lora, task, generation, spec=SPEC, shared=True)
    assert set(shared) == {"shared", "total"}
    assert shared["shared"] == pytest.approx(cos["text_experts"]) == pytest.approx(cos["total"])


def test_plain_peft_lora_is_one_shared_group():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                          init_lora_weights=False))
    ids = image_sequence(2)
    with pytest.raises(ValueError, match="pass spec="):
        conflict_cosines(lora, {"input_ids": ids}, {"input_ids": ids})
    cos = conflict_cosines(lora, {"input_ids": ids, "labels": image_labels(ids)}, {"input_ids": ids}, spec=SPEC)
    assert set(cos) == {"shared", "total"} and cos["shared"] == pytest.approx(cos["total"])
    assert cos["total"] == pytest.approx(1.0)


def test_plot_conflict(tmp_path):
    history = {"mode": [{"step": 0, "task": "a", "text_experts": 0.1, "image_expert": 0.0, "total": 0.05},
                        {"step": 10, "task": "a", "text_experts": -0.2, "image_expert": 0.1, "total": -0.1}],
               "lora": [{"step": 0, "shared": -0.3, "total": -0.3}, {"step": 10, "shared": -0.4, "total": -0.4}]}
    plot_conflict(history, tmp_path / "conflict.png")
    assert (tmp_path / "conflict.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no probe entry"):
        plot_conflict({"mode": []}, tmp_path / "empty.png")
