"""``import mode`` is the method only: the experiment harness's dependencies stay out."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_mode_loads_neither_scikit_learn_nor_matplotlib():
    code = ("import sys, mode; mode.apply_mode, mode.kd_loss, mode.MoDELinear, mode.save_adapter; "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'yaml', 'mode.train', 'mode.workloads') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
