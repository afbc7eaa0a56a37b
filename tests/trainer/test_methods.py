"""The baselines beside MoDE: what each trains on (joint, replay), the EWC penalty and its Fisher,
LoRA at MoDE's parameter count, KD routing of the generation stream; one tiny run of all of them."""
import json

import numpy as np
import pytest
import torch
from trainer.test_train import SMOKE_ARGS

from mode.modality import IMAGE, ModalitySpec
from mode.train import adapting, cli, ewc, loop, methods, rehearsal, resume
from mode.train.config import TrainConfig
from mode.workloads.digits import model as dm


class Rows:
    """A workload of three tasks whose rows are ints (task t: 100 t .. 100 t + 9)."""
    task_names = ["a", "b", "c"]

    def task_rows(self, index):
        return list(range(100 * index, 100 * index + 10))

    @staticmethod
    def collate(rows):
        return {"input_ids": torch.tensor(rows)}


def _drawn(step_rows, config, draws=20):
    rng = np.random.default_rng(0)
    return [step_rows.draw(rng, Rows.collate, config, torch.device("cpu"))["input_ids"].tolist() for _ in range(draws)]


def test_joint_draws_from_every_task_and_lora_from_the_current_one():
    config = TrainConfig(batch_size=16)
    joint = rehearsal.step_rows(Rows(), methods.METHODS["joint"], config, task_index=0)
    assert sorted(joint.rows) == [r for t in range(3) for r in Rows().task_rows(t)]
    assert {row // 100 for batch in _drawn(joint, config) for row in batch} == {0, 1, 2}
    lora = rehearsal.step_rows(Rows(), methods.METHODS["lora"], config, task_index=1)
    assert {row // 100 for batch in _drawn(lora, config) for row in batch} == {1}


def test_replay_mixes_its_share_of_a_fixed_buffer_of_earlier_tasks():
    config = TrainConfig(batch_size=10, replay_size=4, replay_share=0.3, seed=5)
    first = rehearsal.step_rows(Rows(), methods.METHODS["replay"], config, task_index=0)
    assert first.replay == [] and all(row < 100 for batch in _drawn(first, config) for row in batch)
    third = rehearsal.step_rows(Rows(), methods.METHODS["replay"], config, task_index=2)
    assert [row // 100 for row in third.replay] == [0] * 4 + [1] * 4 and len(set(third.replay)) == 8
    assert third.replay[:4] == rehearsal.step_rows(Rows(), methods.METHODS["replay"], config, 1).replay  # fixed
    for batch in _drawn(third, config):
        assert sum(row // 100 == 2 for row in batch) == 7  # 10 rows, 3 replayed
        assert all(row in third.replay for row in batch if row // 100 != 2)


def _tiny_lora(method="ewc"):
    vocab = dm.DigitsVocab()
    torch.manual_seed(0)
    model = dm.build_model(vocab, dm.DigitsModelConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2))
    spec = ModalitySpec(**vocab.modality_spec_args())
    model = adapting.apply_method(model, methods.METHODS[method], TrainConfig(dropout=0.0), spec, len(vocab))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # lora_B starts at 0: give every adapter a gradient
    return vocab, model


def _rows(vocab, count):
    from mode.workloads.digits import data as digits

    data = digits.load_digits_split()
    return digits.task_examples(vocab, digits.CONTINUAL_TASKS[0], data.train_images[:count],
                                data.train_labels[:count])


def test_ewc_fisher_is_the_mean_squared_per_row_gradient_and_the_penalty_pulls_to_the_anchor():
    vocab, model = _tiny_lora()
    rows = _rows(vocab, 5)
    params = [p for p in model.parameters() if p.requires_grad]
    assert ewc.ewc_penalty(model, 10.0).item() == 0.0  # nothing consolidated yet
    collate = lambda r: dm.digits.collate(r, vocab.pad)  # noqa: E731
    ewc.consolidate(model, rows, collate, samples=5, seed=[0])
    gold = [torch.zeros_like(p) for p in params]
    for row in rows:  # every row once (5 of 5)
        batch = collate([row])
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
        for g, grad in zip(gold, torch.autograd.grad(loss, params)):
            g += grad ** 2 / len(rows)
    state = ewc.ewc_state(model)
    for fisher, g, anchor, p in zip(state.fisher(), gold, state.anchors(), params):
        torch.testing.assert_close(fisher, g, rtol=1e-4, atol=1e-10)
        assert torch.equal(anchor, p.detach())
    assert sum(f.sum() for f in state.fisher()) > 0
    with torch.no_grad():
        deltas = [torch.randn_like(p) * 0.01 for p in params]
        for p, d in zip(params, deltas):
            p += d
    expected = 10.0 / 2 * sum((f * d ** 2).sum() for f, d in zip(state.fisher(), deltas))
    torch.testing.assert_close(ewc.ewc_penalty(model, 10.0), expected, rtol=1e-4, atol=1e-12)


def test_ewc_state_travels_with_the_checkpoint(tmp_path):
    vocab, model = _tiny_lora()
    ewc.consolidate(model, _rows(vocab, 3), lambda r: dm.digits.collate(r, vocab.pad), samples=3, seed=[1])
    resume.save_checkpoint(tmp_path / "ckpt", model, extra={"step": 0})
    _, fresh = _tiny_lora()
    assert all(f.abs().sum() == 0 for f in ewc.ewc_state(fresh).fisher())
    resume.load_adapters(tmp_path / "ckpt", fresh)
    for a, b in zip(ewc.ewc_state(model).buffers(), ewc.ewc_state(fresh).buffers()):
        assert torch.equal(a, b)


def test_lora_matched_has_about_modes_trainable_parameters():
    vocab = dm.DigitsVocab()
    spec = ModalitySpec(**vocab.modality_spec_args())
    counts = {name: methods.trainable_params(adapting.apply_method(
        dm.build_model(vocab, dm.DigitsModelConfig()), methods.METHODS[name], TrainConfig(), spec, len(vocab)),
        methods.METHODS[name]) for name in ("mode", "lora", "lora-matched")}
    rank_params = counts["lora"] // TrainConfig().rank  # LoRA parameters per unit of rank
    assert abs(counts["lora-matched"] - counts["mode"]) <= rank_params / 2
    assert counts["lora-matched"] == 42 * rank_params


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
    """One tiny run of the baselines with a mechanism of their own (joint and lora-matched differ from
    them only in what the unit tests above check) with --kd-routing image and --kd-topk 3, recording
    each KD batch's modality ids and top-k."""
    output = tmp_path_factory.mktemp("baselines")
    cache = str(tmp_path_factory.mktemp("pretrained"))
    names = ("replay", "ewc", "lora-kd", "mode")
    config, _ = cli.parse_args(["--output", str(output), "--cache-dir", cache, *SMOKE_ARGS, "--methods",
                                ",".join(names), "--kd-routing", "image", "--kd-topk", "3", "--replay-size", "3",
                                "--ewc-samples", "2"])
    seen = []
    real_kd_loss = loop.kd_loss

    def recording_kd_loss(model, batch, **kwargs):
        seen.append((batch.get("modality_ids"), kwargs["teacher"].indices.shape[-1]))  # the teacher's top k
        return real_kd_loss(model, batch, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "kd_loss", recording_kd_loss)
        loop.run(config, output, cache_dir=cache, progress=False)
    return output, names, seen


def test_every_baseline_runs_and_is_reported(baselines_run):
    output, names, _ = baselines_run
    metrics = json.loads((output / "metrics.json").read_text())
    assert list(metrics["methods"]) == list(names)
    for name, method in metrics["methods"].items():
        [m] = method["per_seed"]
        assert len(m["acc_matrix"]) == 4 and all(v > 0 for row in m["answer_nll_matrix"] for v in row), name
        assert (m["loss_history"]["kd"][0] is None) == (name not in ("lora-kd", "mode")), name
    results = (output / "results.md").read_text()
    assert all(f"| {name} |" in results for name in names)


def test_kd_routing_image_sends_modes_generation_stream_to_the_image_expert(baselines_run):
    _, _, seen = baselines_run
    steps = 4 * 4  # --steps-per-task 4, four tasks, for each of lora-kd and mode
    assert len(seen) == 2 * steps
    lora_kd, mode = seen[:steps], seen[steps:]
    assert all(ids is None for ids, _ in lora_kd)  # no modality split: every token routed alike
    assert all(ids is not None and bool((ids == IMAGE).all()) for ids, _ in mode)


def test_kd_topk_reaches_the_distillation_loss(baselines_run):
    output, _, seen = baselines_run
    assert seen and {topk for _, topk in seen} == {3}
    metrics = json.loads((output / "metrics.json").read_text())
    for name in ("lora-kd", "mode"):
        [run] = metrics["methods"][name]["per_seed"]
        assert all(v > -1e-6 for v in run["loss_history"]["kd"]), name  # a KL, up to rounding
