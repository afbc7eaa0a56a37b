"""The native backend's build: cached across processes, switched off by MODE_KERNELS_NATIVE=0, and a
clear one-time warning plus the torch backend when it cannot be compiled (each case in a fresh process)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    out, err = probe(CXX=str(tmp_path / "no-such-compiler"), MODE_CACHE_DIR=str(tmp_path / "cache"))
    assert "auto: torch torch torch" in out
    assert "native error: backend='native' is unavailable: building the native CPU kernels failed" in out
    assert err.count("RuntimeWarning: mode_kernels: building the native CPU kernels failed") == 1


def pyproject_setuptools():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_ships_every_package_and_the_sources():
    """The package list is explicit (csrc/ is mapped into mode_kernels): it must not miss a package."""
    from setuptools import find_namespace_packages

    from mode_kernels.native.build import HEADERS, SOURCES
    config = pyproject_setuptools()
    found = find_namespace_packages(str(REPO), include=["mode_kernels*", "mode*"])
    assert sorted(config["packages"]) == sorted([*found, "mode_kernels.csrc"])
    assert config["package-dir"] == {"mode_kernels.csrc": "csrc"}
    shipped = {p.name for pattern in config["package-data"]["mode_kernels.csrc"] for p in (REPO / "csrc").glob(pattern)}
    assert shipped == {*SOURCES, *HEADERS}


def test_an_installed_package_finds_its_sources(tmp_path):
    """A regular install's layout (as pyproject.toml builds the wheel): site/mode_kernels with csrc inside it
    and no source tree around it."""
    config = pyproject_setuptools()
    site = tmp_path / "site"
    shutil.copytree(REPO / "mode_kernels", site / "mode_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "mode_kernels" / "csrc").mkdir()
    for pattern in config["package-data"]["mode_kernels.csrc"]:
        for path in (REPO / "csrc").glob(pattern):
            shutil.copy(path, site / "mode_kernels" / "csrc")
    code = ("import mode_kernels; from mode_kernels.native import build; "
            "print(mode_kernels.__file__); print(build.CSRC); print(len(build.source_hash()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    package_file, csrc, hash_length = done.stdout.split()
    assert Path(package_file).is_relative_to(site)
    assert Path(csrc) == site / "mode_kernels" / "csrc" and hash_length == "64"
