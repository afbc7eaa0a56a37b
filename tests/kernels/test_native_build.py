"""The native backend's build: cached across processes, switched off by MODE_KERNELS_NATIVE=0, and a
clear one-time warning plus the torch backend when it cannot be compiled (each case in a fresh process)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import warnings, torch, mode_kernels as mk
warnings.simplefilter("always")
cpu = torch.device("cpu")
print("auto:", *(mk.backends.resolve("auto", cpu, op) for op in ("routed_lora", "fused_linear_kd_kl", "kd_kl")))
try:
    mk.backends.resolve("native", cpu, "routed_lora")
    print("native: ok")
except RuntimeError as exc:
    print("native error:", exc)
"""


def probe(**env):
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_a_built_extension_is_imported_not_rebuilt():
    from mode_kernels import native
    native.extension()  # built (or imported) in this process first
    out, err = probe()
    assert "auto: native native native" in out and "native: ok" in out
    assert "compiling" not in err


def test_switched_off_by_the_environment():
    out, err = probe(MODE_KERNELS_NATIVE="0")
    assert "auto: torch torch torch" in out
    assert "native error: backend='native' is unavailable" in out and "MODE_KERNELS_NATIVE=0" in out
    assert "RuntimeWarning" not in err


def test_missing_compiler_warns_once_and_falls_back_to_torch(tmp_path):
    out, err = probe(CXX=str(tmp_path / "no-such-compiler"), MODE_KERNELS_CACHE=str(tmp_path / "cache"))
    assert "auto: torch torch torch" in out
    assert "native error: backend='native' is unavailable: building the native CPU kernels failed" in out
    assert err.count("RuntimeWarning: mode_kernels: building the native CPU kernels failed") == 1
