"""The wheel holds the two packages and the native sources, nothing else (bench/ runs from a checkout).

Installing the wheel needs the package index, so that is .ci/run's job; this test only builds it
(setuptools' own backend, no isolation, from a copy of the tree so that the checkout stays clean).
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_mode_mode_kernels_the_sources_and_the_license(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("mode", "mode_kernels", "csrc", "bench"):  # bench/ copied too: it must be left out, not absent
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True)
    wheel, = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    assert top == {"mode", "mode_kernels", dist_info}
    assert not any(name.startswith("bench/") for name in names)
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    shipped = {Path(name).name for name in names if name.startswith("mode_kernels/csrc/")}
    assert shipped == {p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert {"mode/__init__.py", "mode_kernels/__init__.py", "mode/train/cli.py"} <= set(names)
