"""PEFT's own generic tests (its source distribution's tests/testing_common.py and test_decoder_models.py),
driven on MoDE configs: a pinned copy of the sdist in the user cache (``mode_kernels.cache.cache_dir()``),
never copied into this repository.

``peft_tests()`` fetches the sdist once (``pip download``), checks its sha256, extracts PEFT's tests/ as the
package ``peft_tests`` beside it, and imports it with ``diffusers`` stubbed (testing_common imports
StableDiffusionPipeline at module level; no test driven here uses it). Without the sdist and no way to
fetch it, it fails with the command that fetches it: it does not skip.
"""
import hashlib
import importlib
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

from mode_kernels.cache import cache_dir

PEFT_VERSION = "0.22.0"
SDIST_SHA256 = "e7fca396b98e6c1b0b02538e45efd84875c4d0d074c29c837e372cd7c845647a"
PACKAGE = "peft_tests"


def sdist_dir() -> Path:
    return cache_dir() / f"peft-{PEFT_VERSION}-sdist"


def fetch_command() -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(sdist_dir()),
            f"peft=={PEFT_VERSION}"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist's path, fetched into the cache if missing; pytest.fail naming the command otherwise."""
    tarball = sdist_dir() / f"peft-{PEFT_VERSION}.tar.gz"
    if not tarball.is_file():
        sdist_dir().mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(fetch_command(), capture_output=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not tarball.is_file():
        pytest.fail(f"PEFT {PEFT_VERSION}'s source distribution (its generic tests) is not in {sdist_dir()} and could "
                    f"not be fetched; run: {' '.join(fetch_command())}", pytrace=False)
    if _sha256(tarball) != SDIST_SHA256:
        pytest.fail(f"{tarball}: sha256 {_sha256(tarball)}, expected {SDIST_SHA256} (peft {PEFT_VERSION}); delete it "
                    f"and run: {' '.join(fetch_command())}", pytrace=False)
    return tarball


def peft_tests(module: str) -> types.ModuleType:
    """``peft_tests.<module>`` (e.g. "test_decoder_models") from the pinned sdist."""
    tarball = fetch_sdist()
    package = sdist_dir() / PACKAGE
    if not (package / "__init__.py").is_file():
        prefix = f"peft-{PEFT_VERSION}/tests/"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name.endswith(".py")
                       and "/" not in m.name[len(prefix):]]
            for member in members:
                member.name = member.name[len(prefix):]
                archive.extract(member, package, filter="data")
        (package / "__init__.py").write_text("")
    if "diffusers" not in sys.modules:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            stub = types.ModuleType("diffusers")
            stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
            sys.modules["diffusers"] = stub
    if str(sdist_dir()) not in sys.path:
        sys.path.insert(0, str(sdist_dir()))
    return importlib.import_module(f"{PACKAGE}.{module}")
