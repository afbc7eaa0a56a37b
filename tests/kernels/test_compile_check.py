"""The compile check compiles the package's Triton kernels for sm_90 on any machine (no GPU)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_configs_compile_for_sm90_without_spills():
    # A fresh process without TRITON_INTERPRET: the interpreter would replace the compiled kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mode_kernels.tools.compile_check", "--arch", "90", "--default-only"]
    result = subprocess.run(cmd,
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("sm90")]
    assert any("routed_lora.gemm[forward" in row for row in rows), result.stdout
    assert any("routed_lora.gemm[dx" in row for row in rows), result.stdout
    gemms = [row.split() for row in rows if "routed_lora.gemm" in row]
    assert all(row[4] == "yes" for row in gemms), "fused GEMM without wgmma on sm_90"
    assert all(row[5] == "yes" for row in gemms if row[-1] == "tma"), "TMA GEMM without cp.async.bulk.tensor"
    assert any(row[-1] == "tma" for row in gemms), "no TMA variant of the GEMM compiled for sm_90"
