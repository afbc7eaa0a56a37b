"""mode.train: metrics, a smoke run's files and schema, resume after a real kill, bad input."""
import contextlib
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mode.train import adapting, cli, kd_teacher, loop, methods, resume
from mode.train.config import RunError, TrainConfig
from mode.train.metrics import average_accuracy, backward_transfer, forgetting, new_task_accuracy, task_score_metrics
from mode.workloads.digits import data as digits

REPO = Path(__file__).resolve().parents[2]
# a few steps of everything: checks plumbing and files, not accuracy
SMOKE_ARGS = ["--pretrain-steps", "2", "--steps-per-task", "4", "--batch-size", "4", "--eval-size", "8",
              "--gen-samples", "1", "--checkpoint-every", "2", "--no-progress", "--device", "cpu"]
# tiny tensors: more threads only add overhead, and on a busy machine a lot of it
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrained"))


def _cli(output, cache_dir, *extra):
    return [sys.executable, "-m", "mode.train", "--output", str(output), "--cache-dir", cache_dir, *SMOKE_ARGS, *extra]


def _run_cli(output, cache_dir, *extra):
    """`mode-train` in a process of its own (a run that is killed)."""
    env = {**os.environ, **ENV}
    return subprocess.run(_cli(output, cache_dir, *extra), capture_output=True, text=True, env=env, timeout=900)


def _main(output, cache_dir, *extra):
    """`mode-train`'s entry point in this process: (exit code, stdout, stderr). The interpreter and its
    imports are already up, which saves seconds per run; a killed run needs `_run_cli`."""
    return _main_argv(_cli(output, cache_dir, *extra)[3:])


def _main_argv(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's usage errors (any other exception fails the test)
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_continual_metrics_on_a_hand_made_matrix():
    # task 0 improves after task 1 (0.6 -> 0.8): forgetting counts from its best, BWT from its diagonal
    acc = [[0.6, 0.1, 0.0],
           [0.8, 0.7, 0.2],
           [0.5, 0.3, 0.9]]
    assert average_accuracy(acc) == pytest.approx((0.5 + 0.3 + 0.9) / 3)
    assert new_task_accuracy(acc) == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert forgetting(acc) == pytest.approx(((0.8 - 0.5) + (0.7 - 0.3)) / 2)
    assert backward_transfer(acc) == pytest.approx(((0.5 - 0.6) + (0.3 - 0.7)) / 2)
    assert backward_transfer([[0.4]]) == 0.0
    # lower is better: the final NLL minus the lowest it had
    nll = [[2.0, 5.0, 6.0],
           [1.5, 1.0, 5.5],
           [2.5, 3.0, 0.9]]
    assert forgetting(nll, lower_is_better=True) == pytest.approx(((2.5 - 1.5) + (3.0 - 1.0)) / 2)
    assert forgetting([[0.4]]) == 0.0 and new_task_accuracy([[0.4]]) == pytest.approx(0.4)
    metrics = task_score_metrics([{"accs": row, "answer_nlls": nll_row} for row, nll_row in zip(acc, nll)])
    assert metrics["new_acc"] == pytest.approx(new_task_accuracy(acc))
    assert metrics["forgetting"] == pytest.approx(0.35)
    assert metrics["answer_nll_forgetting"] == pytest.approx(1.5)
    assert metrics["new_answer_nll"] == pytest.approx((2.0 + 1.0 + 0.9) / 3)
    assert "digit_acc_matrix" not in metrics


def test_trainable_params_count_only_reachable_adapters():
    from mode.modality import ModalitySpec
    from mode.workloads.digits import model as dm

    vocab = dm.DigitsVocab()
    spec = ModalitySpec(**vocab.modality_spec_args())
    config = TrainConfig()
    counts = {}
    for name, method in methods.METHODS.items():
        model = adapting.apply_method(dm.build_model(vocab, dm.DigitsModelConfig()), method, config, spec,
                                     len(vocab), vocab.image_code_range)
        counts[name] = methods.trainable_params(model, method)
    h, m, layers, r = 128, 344, 2, config.rank
    lora_per_layer = r * (h + m) * 2 + r * (m + h)  # gate, up: h -> m; down: m -> h
    assert counts["lora"] == layers * lora_per_layer
    routers = layers * 4 * (h + h + m)
    assert counts["moelora"] == layers * 4 * lora_per_layer + routers
    assert counts["mode"] == counts["mode-nokd"] == counts["moelora"] + layers * lora_per_layer


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    """An uninterrupted smoke run of mode and lora: its output directory."""
    output = tmp_path_factory.mktemp("reference")
    code, out, err = _main(output, cache_dir, "--methods", "mode,lora")
    assert code == 0, err[-3000:]
    assert "## Comparison" in out
    return output


RUN_KEYS = {"seed", "acc_matrix", "avg_acc", "bwt", "new_acc", "forgetting", "digit_acc_matrix", "avg_digit_acc",
            "digit_bwt", "new_digit_acc", "digit_forgetting", "answer_nll_matrix", "avg_answer_nll", "answer_nll_bwt",
            "new_answer_nll", "answer_nll_forgetting", "gen_acc", "gen_retention", "image_nll",
            "train_seconds", "trainable_params", "loss_history", "adapters"}


def test_smoke_run_writes_metrics_tables_and_plots(reference_run):
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert metrics["benchmark"] == "digits" and metrics["seeds"] == [0]
    tasks = [task.name for task in digits.CONTINUAL_TASKS]
    assert metrics["tasks"] == tasks
    assert set(metrics["pretrained"]) == {"gen_acc", "image_nll"}
    assert list(metrics["methods"]) == ["mode", "lora"]
    for method in metrics["methods"].values():
        [m] = method["per_seed"]
        assert set(m) == RUN_KEYS and m["seed"] == 0
        history = m["loss_history"]
        assert len(history["ce"]) == len(history["kd"]) == 4 * len(tasks)  # --steps-per-task 4
        assert all(isinstance(v, float) and v > 0 for v in history["ce"])
        for key in ("acc_matrix", "digit_acc_matrix", "answer_nll_matrix"):
            assert len(m[key]) == len(tasks) and all(len(row) == len(tasks) for row in m[key]), key
        assert all(0 <= a <= d <= 1 for r, dr in zip(m["acc_matrix"], m["digit_acc_matrix"]) for a, d in zip(r, dr))
        assert all(v > 0 for row in m["answer_nll_matrix"] for v in row)
        assert len(m["gen_acc"]) == len(m["image_nll"]) == len(tasks)
        assert isinstance(m["trainable_params"], int) and m["train_seconds"] > 0
        assert m["avg_acc"] == pytest.approx(average_accuracy(m["acc_matrix"]))
        assert m["answer_nll_bwt"] == pytest.approx(backward_transfer(m["answer_nll_matrix"]))
        # one seed: the summary is each value with no standard error
        assert method["summary"]["avg_acc"] == [m["avg_acc"], None]
        assert method["summary"]["gen_acc_last"] == [m["gen_acc"][-1], None]
    # every method's adapters survive the run (the checkpoint holds the last method's only)
    assert all((reference_run / "adapters" / name / "adapter_config.json").is_file() for name in ("mode", "lora"))
    results = (reference_run / "results.md").read_text()
    assert "| mode |" in results and "| lora |" in results and "answer NLL" in results and "±" not in results
    kd = {name: m["per_seed"][0]["loss_history"]["kd"] for name, m in metrics["methods"].items()}
    # a KL divergence, >= 0 up to rounding (at the first step the student is the teacher: 0)
    assert all(isinstance(v, float) and v > -1e-6 for v in kd["mode"]) and set(kd["lora"]) == {None}
    for png in ("acc_matrix_mode.png", "acc_matrix_lora.png", "gen_acc.png", "generated_digits.png", "loss.png"):
        assert (reference_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_run_every_method_per_seed_and_summarise_mean_and_standard_error(tmp_path, cache_dir, reference_run):
    code, _, err = _main(tmp_path, cache_dir, "--methods", "lora", "--seeds", "0,1")
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1]
    lora = metrics["methods"]["lora"]
    assert [m["seed"] for m in lora["per_seed"]] == [0, 1]
    # seed 0 of --seeds is the run of --seed 0 (the pretrained model is scored with the first seed)
    seed0 = {k: v for k, v in lora["per_seed"][0].items() if k != "train_seconds"}
    reference = _without_timing(reference_run / "metrics.json")["methods"]["lora"]["per_seed"][0]
    # each seed's adapters in their own directory
    assert (seed0.pop("adapters"), reference.pop("adapters")) == ("adapters/lora-seed0", "adapters/lora")
    assert seed0 == reference
    values = [m["bwt"] for m in lora["per_seed"]]
    mean, se = lora["summary"]["bwt"]
    assert mean == pytest.approx(sum(values) / 2)
    assert se == pytest.approx(abs(values[0] - values[1]) / 2)  # sample std / sqrt(2) of two values
    assert set(lora["summary"]) >= {"avg_acc", "bwt", "gen_retention", "avg_digit_acc", "avg_answer_nll"}
    assert "± " in (tmp_path / "results.md").read_text()


def test_jobs_give_each_run_the_serial_runs_metrics_at_equal_threads(tmp_path, cache_dir):
    threads = torch.get_num_threads()  # --threads sets this process's; restored for the tests after
    try:
        runs = {jobs: _main(tmp_path / f"jobs{jobs}", cache_dir, "--methods", "lora,joint", "--seeds", "0,1", "--jobs",
                            jobs, "--threads", "1") for jobs in ("1", "2")}
    finally:
        torch.set_num_threads(threads)
    assert all(code == 0 for code, _, _ in runs.values()), runs["2"][2][-3000:]
    serial, parallel = (_without_timing(tmp_path / f"jobs{jobs}" / "metrics.json") for jobs in ("1", "2"))
    assert parallel == serial and list(parallel["methods"]) == list(serial["methods"]) == ["lora", "joint"]
    out = runs["2"][1]
    assert "4 run(s) in 2 worker processes, 1 torch thread(s) each" in out
    assert "[1/4]" in out and "[4/4]" in out and "lora-seed0 done" in out and "joint-seed1 done" in out
    assert not (tmp_path / "jobs2" / "jobs").exists()  # each run's own resume state goes once it has finished
    assert all((tmp_path / "jobs2" / "adapters" / f"lora-seed{s}" / "adapter_config.json").is_file() for s in (0, 1))


def _without_timing(path):
    metrics = json.loads(path.read_text())
    for method in metrics["methods"].values():
        method["summary"].pop("train_seconds")
        for m in method["per_seed"]:
            m.pop("train_seconds")
    return metrics


def test_kd_teacher_cache_changes_no_result_and_a_later_run_reads_it(tmp_path, cache_dir, reference_run):
    """The teacher's top k read from the cache (which the reference run wrote) or computed on every KD batch
    (--no-kd-cache): the same metrics, bit for bit; a later run's teacher is the file, not recomputed."""
    code, _, err = _main(tmp_path, cache_dir, "--methods", "mode", "--no-kd-cache")
    assert code == 0, err[-3000:]
    uncached, cached = (_without_timing(p / "metrics.json")["methods"]["mode"] for p in (tmp_path, reference_run))
    assert uncached == cached
    config, _ = cli.parse_args(["--output", str(tmp_path), "--cache-dir", cache_dir, *SMOKE_ARGS, "--methods", "mode"])
    workload = loop.load_workload(config, torch.device("cpu"), cache_dir, progress=False)
    cache = kd_teacher.load_teacher_cache(workload, config, torch.device("cpu"), cache_dir, progress=False)
    assert not cache.computed and cache.indices.shape[1] == 17  # the digits benchmark's whole code slice
    assert [cache.path] == list((Path(cache_dir) / kd_teacher.CACHE_SUBDIR).iterdir())


def _checkpoint_mid_task(path):
    """The checkpoint's in-progress position, if it is inside a task of the first method."""
    try:
        state = resume.checkpoint_extra(path)
    except (OSError, ValueError):  # not written yet, or being replaced
        return None
    current = state.get("current")
    return current if current and current["step"] > 0 and not state["done"] else None


def test_killed_run_resumes_to_the_same_metrics(tmp_path, cache_dir, reference_run):
    methods = ("--methods", "mode,lora")
    output = tmp_path / "killed"
    env = {**os.environ, **ENV}
    process = subprocess.Popen(_cli(output, cache_dir, *methods), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    killed_at = None
    while process.poll() is None and time.monotonic() < deadline:
        killed_at = _checkpoint_mid_task(output / "checkpoint")
        if killed_at is not None:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert killed_at is not None, "the run ended before a mid-task checkpoint was seen"
    assert process.returncode == -signal.SIGKILL
    assert not (output / "metrics.json").exists()

    code, _, err = _main(output, cache_dir, *methods, "--resume")
    assert code == 0, err[-3000:]
    assert _without_timing(output / "metrics.json") == _without_timing(reference_run / "metrics.json")


def _tree(path):
    """Every file under ``path`` and a hash of its bytes: what a refused run must leave as it was."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_ctrl_c_stops_at_a_step_and_prints_the_command_that_resumes(tmp_path, cache_dir, reference_run):
    methods = ("--methods", "lora")  # the reference's second method, on its own: the same per-seed results
    output = tmp_path / "stopped"
    command = _cli(output, cache_dir, *methods)
    process = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if _checkpoint_mid_task(output / "checkpoint") is not None:  # training is under way
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and not (output / "metrics.json").exists()
    [line] = [line for line in err.splitlines() if line.startswith("mode-train: stopped by SIGINT; checkpoint kept")]
    resume_argv = shlex.split(line.split("resume with: ", 1)[1])
    assert resume_argv == [*command, "--resume"]

    before = _tree(output)
    code, _, err = _main_argv(command[3:])  # the same command again: refused, nothing touched
    assert code == 2 and "holds a checkpoint of this run: add --resume to continue it, or --overwrite" in err
    assert _tree(output) == before

    code, _, err = _main_argv(resume_argv[3:])  # the printed command, in this process
    assert code == 0, err[-3000:]
    metrics, reference = _without_timing(output / "metrics.json"), _without_timing(reference_run / "metrics.json")
    assert metrics["pretrained"] == reference["pretrained"]
    assert metrics["methods"]["lora"] == reference["methods"]["lora"]


def test_sigterm_stops_after_the_step_it_arrives_in(tmp_path, cache_dir, monkeypatch):
    train_step = loop.train_step

    def step_then_sigterm(*args):
        losses = train_step(*args)
        if args[7] == 1:  # the step index: a scheduler's notice during the second step of the first task
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(loop, "train_step", step_then_sigterm)
    code, _, err = _main(tmp_path, cache_dir, "--methods", "lora", "--checkpoint-every", "3")
    assert code == 143 and "mode-train: stopped by SIGTERM; checkpoint kept" in err, err[-3000:]
    state = resume.checkpoint_extra(tmp_path / "checkpoint")
    assert (state["current"]["task"], state["current"]["step"]) == (0, 2)  # saved right after that step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_overwrite_deletes_the_runs_files_only(tmp_path):
    for name in ("checkpoint/trainer_state.json", "adapters/lora/adapter_config.json", "metrics.json",
                 "config.json", "loss.png", "acc_matrix_lora.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    with pytest.raises(RunError, match="--resume and --overwrite exclude each other"):
        resume.claim_output(tmp_path, "{}", resume=True, overwrite=True)
    with pytest.raises(RunError, match="holds a checkpoint and finished results of this run"):
        resume.claim_output(tmp_path, "{}", resume=False, overwrite=False)
    resume.claim_output(tmp_path, "{}", resume=True, overwrite=False)  # continuing is allowed
    resume.claim_output(tmp_path, '{"seed": 1}', resume=False, overwrite=True)  # even another run's
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "config.json").write_text("{\n  not json")
    with pytest.raises(RunError, match=r"config\.json:2: not valid JSON .*choose another --output, or add --overwrite"):
        resume.claim_output(tmp_path, "{}", resume=False, overwrite=False)


def test_gradient_checkpointing_changes_no_result(tmp_path, cache_dir, reference_run):
    # MoDE's layers are the ones whose recompute must see their forward's routing
    config, _ = cli.parse_args(["--output", str(tmp_path), "--cache-dir", cache_dir, *SMOKE_ARGS,
                                "--methods", "mode", "--gradient-checkpointing"])
    loop.run(config, tmp_path, cache_dir=cache_dir, progress=False)
    metrics, reference = _without_timing(tmp_path / "metrics.json"), _without_timing(reference_run / "metrics.json")
    for name, method in metrics["methods"].items():
        [m], [ref] = method["per_seed"], reference["methods"][name]["per_seed"]
        assert m["acc_matrix"] == ref["acc_matrix"] and m["gen_acc"] == ref["gen_acc"], name
        assert m["image_nll"] == pytest.approx(ref["image_nll"], rel=1e-5), name
        assert m["loss_history"]["ce"] == pytest.approx(ref["loss_history"]["ce"], rel=1e-5), name


def test_conflict_probe_is_logged_and_plotted_and_changes_no_result(tmp_path, cache_dir, reference_run):
    config, _ = cli.parse_args(["--output", str(tmp_path), "--cache-dir", cache_dir, *SMOKE_ARGS,
                                  "--methods", "mode,lora", "--probe-conflict", "2"])
    loop.run(config, tmp_path, cache_dir=cache_dir, progress=False)
    metrics = _without_timing(tmp_path / "metrics.json")
    conflict = {name: m["per_seed"][0].pop("conflict") for name, m in metrics["methods"].items()}
    assert metrics == _without_timing(reference_run / "metrics.json")  # the probe changes no training result
    groups = {"mode": {"text_experts", "image_expert", "total"}, "lora": {"shared", "total"}}
    for name, entries in conflict.items():
        # every 2 of the 4 steps per task
        expected = [(4 * t + s, task) for t, task in enumerate(metrics["tasks"]) for s in (0, 2)]
        assert [(e["step"], e["task"]) for e in entries] == expected
        for entry in entries:
            assert set(entry) == {"step", "task"} | groups[name]
            assert all(-1.0 <= entry[g] <= 1.0 for g in groups[name])
    assert (tmp_path / "conflict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--methods", "mode,adapterx", "unknown method"),
    ("--benchmark", "mnist", "unknown benchmark"),
    ("--eval-size", "0", "--eval-size 0: expected an integer >= 1"),
    ("--grad-accum", "0", "--grad-accum 0: expected an integer >= 1"),
    ("--device", "cuda", "CUDA is not available"),
])
def test_bad_settings_are_clear_errors_that_leave_no_output_directory(tmp_path, cache_dir, flag, value, message):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = _main(tmp_path / "out", cache_dir, flag, value)  # no exception escapes: no traceback
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists()


def test_seed_and_seeds_together_are_refused(tmp_path, cache_dir):
    code, _, err = _main(tmp_path / "out", cache_dir, "--seed", "3", "--seeds", "1,2")
    assert code == 2 and "--seed 3 and --seeds 1,2: give one" in err
    assert not (tmp_path / "out").exists()


def test_loss_board_writes_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mode.train.report import LossBoard

    with LossBoard(tmp_path) as board:
        board.add_losses("mode", 0, {"loss": 1.5, "ce": 1.25, "kd": 0.75})
        board.add_losses("lora", 0, {"loss": 2.0, "ce": 2.0, "kd": None})
        board.add_evaluation("mode", 4, ["parity"], {"accs": [0.5], "gen_acc": 0.8, "image_nll": None})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"mode/loss": [1.5], "mode/ce": [1.25], "mode/kd": [0.75], "lora/loss": [2.0],
                       "lora/ce": [2.0], "mode/acc/parity": [0.5], "mode/gen_acc": [pytest.approx(0.8)]}


@pytest.mark.parametrize("files", [
    {"trainer_state.json": b"garbage, not a checkpoint"},  # no DCP metadata: an incomplete save
    {"trainer_state.json": b"garbage, not a checkpoint", ".metadata": b"garbage"},
])
def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, cache_dir, files):
    config = TrainConfig(methods=("lora",))
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    (tmp_path / "checkpoint").mkdir()
    for name, content in files.items():
        (tmp_path / "checkpoint" / name).write_bytes(content)
    with pytest.raises(RunError, match="corrupt checkpoint"):
        loop.run(config, tmp_path, resume=True, cache_dir=cache_dir, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == files


def test_output_of_another_run_is_refused_and_kept(tmp_path, cache_dir):
    other = json.dumps(asdict(TrainConfig(seed=123)))
    (tmp_path / "config.json").write_text(other)
    (tmp_path / "metrics.json").write_text("{}")
    code, _, err = _main(tmp_path, cache_dir, "--methods", "lora")
    assert code == 2 and "holds another run" in err
    assert (tmp_path / "config.json").read_text() == other
    assert (tmp_path / "metrics.json").read_text() == "{}"
