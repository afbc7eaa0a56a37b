"""mode.train under torchrun: 2 gloo processes on CPU give the results of one process; --fsdp
runs resume from their DCP checkpoint (in one process, and on another number of processes)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mode.train import cli, loop, resume
from mode.train.config import RunError

REPO = Path(__file__).resolve().parents[2]
# a few steps of one method: checks plumbing and equality, not accuracy
ARGS = ["--methods", "mode", "--pretrain-steps", "2", "--steps-per-task", "3", "--batch-size", "4",
        "--eval-size", "8", "--gen-samples", "1", "--checkpoint-every", "2", "--dropout", "0",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrained"))


def argv(output, cache_dir, *extra):
    return ["--output", str(output), "--cache-dir", cache_dir, *ARGS, *extra]


def run_in_process(args):
    config, parsed = cli.parse_args(args)
    return loop.run(config, parsed.output, resume=parsed.resume, device="cpu", cache_dir=parsed.cache_dir,
                     progress=False)


def torchrun(args):
    """`mode.train` in 2 processes (gloo); the repository root first on the path, as pytest has it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mode.train",
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def assert_same_results(metrics, reference, rel):
    assert metrics["pretrained"] == pytest.approx(reference["pretrained"], rel=rel)
    assert metrics["methods"].keys() == reference["methods"].keys()
    for name, method in metrics["methods"].items():
        m, ref = method["per_seed"][0], reference["methods"][name]["per_seed"][0]
        assert m["acc_matrix"] == ref["acc_matrix"], name
        assert m["gen_acc"] == ref["gen_acc"], name
        assert m["image_nll"] == pytest.approx(ref["image_nll"], rel=rel), name


def test_two_processes_give_the_results_of_one(tmp_path, cache_dir):
    # a fresh pretrained cache: rank 0 pretrains, rank 1 reads its file
    done = torchrun(argv(tmp_path / "two", cache_dir))
    assert done.stdout.count("## Comparison") == 1  # rank 0 alone prints the results
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = run_in_process(argv(tmp_path / "one", cache_dir))
    assert_same_results(two, one, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, cache_dir):
    """An uninterrupted one-process --fsdp run, and one interrupted inside task 1 (after its
    mid-task checkpoint at step 2): their output directories."""
    root = tmp_path_factory.mktemp("fsdp")
    run_in_process(argv(root / "whole", cache_dir, "--fsdp"))
    real_step, calls = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        if len(calls) == 5:  # task 1, step 2
            raise Interrupted
        calls.append(None)
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_step", interrupted_step)
        with pytest.raises(Interrupted):
            run_in_process(argv(root / "interrupted", cache_dir, "--fsdp"))
    current = resume.checkpoint_extra(root / "interrupted" / "checkpoint")["current"]
    assert (current["task"], current["step"]) == (1, 2)
    return root / "whole", root / "interrupted"


def resumable_copy(interrupted, output):
    shutil.copytree(interrupted, output)
    return output


def test_fsdp_run_resumes_to_the_same_metrics(tmp_path, cache_dir, fsdp_runs):
    whole, interrupted = fsdp_runs
    resumed = run_in_process(argv(resumable_copy(interrupted, tmp_path / "resumed"), cache_dir, "--fsdp", "--resume"))
    assert_same_results(resumed, json.loads((whole / "metrics.json").read_text()), rel=0)


def test_fsdp_checkpoint_resumes_on_two_processes(tmp_path, cache_dir, fsdp_runs):
    whole, interrupted = fsdp_runs
    output = resumable_copy(interrupted, tmp_path / "resumed")
    torchrun(argv(output, cache_dir, "--fsdp", "--resume"))
    # the same global batches, gradients reduced over 2 processes: equal up to float rounding
    assert_same_results(json.loads((output / "metrics.json").read_text()),
                        json.loads((whole / "metrics.json").read_text()), rel=1e-5)
    # the sharded layers' adapters are written whole (all-gathered), as the one-process run's
    weights = sorted(p.name for p in (whole / "adapters" / "mode").glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (output / "adapters" / "mode").glob("*.safetensors"))
    for name in weights:
        sharded, single = (load_file(str(run / "adapters" / "mode" / name)) for run in (output, whole))
        assert sharded.keys() == single.keys()
        for key in single:
            # Rounding differs between 2 processes and 1 (and with the thread count): seen at 1 thread
            # per process, one element of 13760 off by 2e-4 to 3e-4, on the code before the native
            # kernels' rework too. Most likely Adam, which divides by the root of the squared-gradient
            # average, grows such differences towards a fraction of one step (lr 3e-3) where that
            # average is near zero (not verified element by element); elsewhere they stay at rounding level.
            difference = (sharded[key] - single[key]).abs()
            assert difference.max() < 1e-3, key
            assert (difference > 1e-4).float().mean() < 1e-3, key


def test_damaged_checkpoint_shard_is_refused_and_kept(tmp_path, cache_dir, fsdp_runs):
    output = resumable_copy(fsdp_runs[1], tmp_path / "damaged")
    shard = next((output / "checkpoint").glob("*.distcp"))
    shard.write_bytes(b"garbage")
    with pytest.raises(RunError, match="corrupt checkpoint"):
        run_in_process(argv(output, cache_dir, "--fsdp", "--resume"))
    assert shard.read_bytes() == b"garbage"


def test_ctrl_c_under_torchrun_stops_every_process_after_one_step_and_the_printed_command_resumes(tmp_path,
                                                                                                   cache_dir):
    """A terminal's Ctrl-C (SIGINT to torchrun and its workers, one process group) while both processes train:
    each stops after the same step with one checkpoint, rank 0 prints once the torchrun command that resumes,
    and that command, run as printed, finishes the run with the results of an uninterrupted one."""
    extra = ("--steps-per-task", "12", "--checkpoint-every", "3")
    output = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mode.train",
           *argv(output, cache_dir, *extra)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        try:
            current = resume.checkpoint_extra(output / "checkpoint").get("current")
        except (OSError, ValueError):  # not written yet, or being replaced
            current = None
        if current and current["step"] > 0:
            os.killpg(process.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=300)
    # torchrun itself ends with a traceback of its SignalException (exit 1); the workers raise none.
    frames = [line for line in err.splitlines() if line.strip().startswith('File "')]
    assert process.returncode == 1 and not [f for f in frames if "/mode/" in f or "mode.train" in f], err[-4000:]
    assert "torch.distributed.elastic.multiprocessing.api.SignalException" in err, err[-4000:]
    assert not (output / "metrics.json").exists()
    lines = [line for line in err.splitlines() if "mode-train: stopped by SIGINT; checkpoint kept" in line]
    assert len(lines) == 1, err[-4000:]
    printed = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert printed[:4] == ["torchrun", "--nproc-per-node=2", "-m", "mode.train"], printed
    assert printed[4:] == [*argv(output, cache_dir, *extra), "--resume"]

    resumed = subprocess.run(printed, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    whole = run_in_process(argv(tmp_path / "whole", cache_dir, *extra))
    assert_same_results(json.loads((output / "metrics.json").read_text()), whole, rel=1e-5)
