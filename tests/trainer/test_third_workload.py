"""A new workload needs the workload protocol only: ``minimal_workload.py`` imports nothing of the
trainer, and an entry point of the group ``mode.workloads`` makes ``--benchmark minimal`` (and its
options' flags) reach it."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_the_minimal_workload_imports_nothing_of_the_trainer():
    tree = ast.parse((HERE / "minimal_workload.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "mode.workloads" in imported
    assert [name for name in imported if name.startswith("mode.train")] == []


def test_an_entry_point_workload_is_trained_by_the_cli(tmp_path):
    # an installed distribution, as pip would leave it: metadata and the entry point only
    dist_info = tmp_path / "site" / "minimal_workload-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: minimal-workload\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[mode.workloads]\nminimal = minimal_workload:WORKLOAD\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), str(tmp_path / "site")])}
    out = tmp_path / "run"
    process = subprocess.run([sys.executable, "-m", "mode.train", "--benchmark", "minimal", "--methods", "mode",
                              "--minimal-rows", "8", "--steps-per-task", "2", "--batch-size", "4", "--eval-size", "4",
                              "--no-progress", "--device", "cpu", "--output", str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["benchmark"], config["minimal_rows"], config["lr"]) == ("minimal", 8, 1e-2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["mode"]
    assert metrics["tasks"] == ["first", "second"]
