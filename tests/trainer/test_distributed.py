"""mode.distributed on real 2-process gloo runs on CPU (torchrun), against one process.

One torchrun launch runs every distributed scenario (process start-up dominates the time) and
writes its results to a directory; the tests compare them with single-process runs here:
(a) DDP training steps (task CE + KD through the unwrapped model, one text-only batch) give the
    same adapters as one process on the same global batches;
(b) FSDP2 (bf16 base, float32 adapters) trains with finite losses and saves a DCP checkpoint that
    one process loads (another world size) into identical adapters and optimizer state;
(c) teacher_mode under both wrappers gives the base model's logits.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import config, image_sequence, randomize_adapters, tiny_model

import mode
from mode.constants import IGNORE_INDEX
from mode.kd import kd_positions
from mode.train import distributed, resume
from mode.train.probe import conflict_cosines

STEPS = 3
GLOBAL_BATCH = 4


def global_batches():
    """The same global batches in every process: two mixed text/image batches and a text-only one."""
    mixed = [image_sequence(GLOBAL_BATCH, seed=s) for s in range(STEPS - 1)]
    text_only = torch.randint(0, 40, (GLOBAL_BATCH, 16), generator=torch.Generator().manual_seed(9))
    return mixed + [text_only]


def build_model():
    base = tiny_model("llama")
    torch.manual_seed(0)  # apply_mode's adapter init draws from the global generator
    return randomize_adapters(mode.apply_mode(base, config()))


def bf16_base():
    """The base model with its parameters cast to bf16 as wrap_fsdp2 casts the frozen base."""
    base = tiny_model("llama")
    for param in base.parameters():
        param.data = param.data.to(torch.bfloat16)
    return base


def training_step(model, optimizer, batch) -> float:
    """Task CE through the (wrapped) model + 0.3 * KD through the unwrapped one, both normalised
    over the global batch."""
    local = distributed.shard_batch({"input_ids": batch, "labels": batch})
    logits = model(input_ids=local["input_ids"]).logits[:, :-1].float()
    targets = local["labels"][:, 1:]
    ce_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    ce = distributed.global_mean(ce_sum, (targets != IGNORE_INDEX).sum())
    kd_sum = mode.kd_loss(distributed.unwrap(model), local, reduction="sum")
    kd = distributed.global_mean(kd_sum, kd_positions(local).sum())
    loss = ce + 0.3 * kd
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # DTensor grads under FSDP2
    optimizer.step()
    return loss.item()


def adapters(model) -> dict:
    return {k: v.detach().float().clone() for k, v in distributed.unwrap(model).named_parameters() if v.requires_grad}


def probe_batches():
    """A task batch scoring the text tokens and a generation batch, sharded to this rank."""
    ids = image_sequence(GLOBAL_BATCH, seed=7)
    task = {"input_ids": ids, "labels": torch.where(ids < 40, ids, IGNORE_INDEX)}
    return distributed.shard_batch(task), distributed.shard_batch({"input_ids": image_sequence(GLOBAL_BATCH, seed=8)})


@torch.no_grad()
def teacher_gap(model, base) -> float:
    """Max |teacher logits of the wrapped model - base model logits| on an image sequence."""
    ids = image_sequence(2, seed=5)
    with mode.teacher_mode(model):
        teacher = model(input_ids=ids).logits.float()
    return (teacher - base(input_ids=ids).logits.float()).abs().max().item()


def run_ddp(out_dir: Path) -> None:
    model = distributed.wrap_ddp(build_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = [training_step(model, optimizer, batch) for batch in global_batches()]
    gap = teacher_gap(model, tiny_model("llama"))
    cosines = conflict_cosines(model, *probe_batches())
    if distributed.is_main():
        torch.save(adapters(model), out_dir / "ddp_adapters.pt")
        distributed.atomic_write_json(out_dir / "ddp.json", {"losses": losses, "teacher_gap": gap, "cosines": cosines,
                                                             "wrapped": type(model).__name__})


def run_fsdp(out_dir: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = distributed.wrap_fsdp2(build_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = [training_step(model, optimizer, batch) for batch in global_batches()]
    gap = teacher_gap(model, bf16_base())
    resume.save_checkpoint(out_dir / "fsdp_ckpt", model, optimizer, extra={"step": STEPS})
    # The full (unsharded) state, to compare the 1-process load with.
    full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=full)
    if distributed.is_main():
        torch.save({"model": model_state, "optimizer": optimizer_state["state"]}, out_dir / "fsdp_full.pt")
        wrapped = type(distributed.decoder_layers(model)[0]).__name__
        distributed.atomic_write_json(out_dir / "fsdp.json", {"losses": losses, "teacher_gap": gap, "wrapped": wrapped})


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    assert distributed.init(), "run me under torchrun"
    try:
        run_ddp(Path(out_dir))
        run_fsdp(Path(out_dir))
    finally:
        distributed.shutdown()


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    # The repository root and tests/ (tiny_models) first on the path, as pytest has it (an editable install made before
    # `mode/` existed does not map it).
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(root / "tests"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out_dir


def test_ddp_two_processes_equal_one_process(two_process_run):
    report = json.loads((two_process_run / "ddp.json").read_text())
    assert report["wrapped"] == "DistributedDataParallel"
    model = build_model()  # not distributed here: wrap_ddp returns it, shard_batch keeps every row
    assert distributed.wrap_ddp(model) is model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in global_batches():
        training_step(model, optimizer, batch)
    two = torch.load(two_process_run / "ddp_adapters.pt")
    one = adapters(model)
    assert two.keys() == one.keys()
    initial = adapters(build_model())
    assert max((one[k] - initial[k]).abs().max() for k in one) > 1e-3  # training moved the adapters
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=k)
    # The probe under DDP averages the ranks' gradients: the cosines of the global batch.
    one_cosines = conflict_cosines(model, *probe_batches())
    assert report["cosines"].keys() == one_cosines.keys()
    for group, value in one_cosines.items():
        assert report["cosines"][group] == pytest.approx(value, abs=1e-4), group


def test_teacher_mode_under_wrappers_is_the_base_model(two_process_run):
    assert json.loads((two_process_run / "ddp.json").read_text())["teacher_gap"] == 0.0
    fsdp = json.loads((two_process_run / "fsdp.json").read_text())
    assert fsdp["wrapped"].startswith("FSDP")  # the class of a sharded decoder layer
    assert fsdp["teacher_gap"] == 0.0  # against the base model cast to bf16 the same way


def test_fsdp2_checkpoint_loads_into_one_process(two_process_run):
    report = json.loads((two_process_run / "fsdp.json").read_text())
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    full = torch.load(two_process_run / "fsdp_full.pt")

    model = build_model()  # another world size (1) and no wrapper: DCP reshards on load
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    extra = resume.load_checkpoint(two_process_run / "fsdp_ckpt", model, optimizer)
    assert extra == {"step": STEPS}
    loaded = adapters(model)
    assert loaded.keys() == full["model"].keys()
    for k, v in full["model"].items():
        assert v.dtype == torch.float32  # adapters stayed float32 next to the bf16 base
        assert torch.equal(loaded[k], v), k
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, param in zip(names, optimizer.param_groups[0]["params"]):
        state = optimizer.state[param]
        assert torch.equal(state["exp_avg"], full["optimizer"][name]["exp_avg"]), name
        assert float(state["step"]) == STEPS


def test_checkpoint_refuses_incomplete_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resume.load_checkpoint(tmp_path / "ckpt", build_model())


def test_single_process_checkpoint_round_trip(tmp_path):
    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    training_step(model, optimizer, global_batches()[0])
    resume.save_checkpoint(tmp_path / "ckpt", model, extra={"step": 1})  # adapters only
    resume.save_checkpoint(tmp_path / "ckpt", model, optimizer, extra={"step": 2})  # replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert resume.checkpoint_extra(tmp_path / "ckpt") == {"step": 2}
    fresh = build_model()
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    assert resume.load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer) == {"step": 2}
    for k, v in adapters(model).items():
        assert torch.equal(adapters(fresh)[k], v), k
    param, fresh_param = (next(p for p in m.parameters() if p.requires_grad) for m in (model, fresh))
    assert torch.equal(fresh_optimizer.state[fresh_param]["exp_avg"], optimizer.state[param]["exp_avg"])


def test_single_process_helpers(tmp_path):
    assert not distributed.init() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main()
    batch = {"input_ids": torch.arange(10).view(5, 2), "note": "kept"}
    parts = [distributed.shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert [len(p["input_ids"]) for p in parts] == [3, 2] and parts[1]["note"] == "kept"
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        distributed.shard_rows(3, 0, 4)
    # The global mean with uneven target counts: rank-local pieces average to the global mean.
    sums, counts = torch.tensor([6.0, 4.0]), torch.tensor([3, 1])
    pieces = [sums[r] * 2 / counts.sum() for r in range(2)]
    assert torch.isclose(sum(pieces) / 2, sums.sum() / counts.sum())
    assert torch.isclose(distributed.global_mean(sums[0], counts[0]), torch.tensor(2.0))
    distributed.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_wrappers_refuse_a_model_without_adapters():
    with pytest.raises(ValueError, match="no trainable parameter"):
        distributed.wrap_ddp(tiny_model("llama").requires_grad_(False))
    with pytest.raises(ValueError, match="no trainable parameter"):
        distributed.wrap_fsdp2(tiny_model("llama").requires_grad_(False))


if __name__ == "__main__":
    main(sys.argv[1])
