"""Build and load the native CPU kernels (csrc/) just in time, once per user and source version.

The compiled library lives in a per-user cache directory (one per checkout and torch version) with a
stamp of the sources, compile flags, torch version and CPU vector capability it was built from: it is
built once and then only loaded; a source change rebuilds what changed. A file lock
(``fcntl.flock``, released if its holder dies) makes concurrent processes such as torchrun's ranks
build it once: the others wait, then load it. Without a working compiler the first use warns once and
the torch backend serves; ``MODE_KERNELS_NATIVE=0`` switches the native backend off.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_dir

SOURCES = ("routed_lora.cpp", "kd_kl.cpp", "kd_topk.cpp", "bindings.cpp")
HEADERS = ("common.h", "kd_rows.h", "ops.h")


def _sources_directory() -> Path:
    """The C++ sources: mode_kernels/csrc in an installed package (pyproject.toml ships the top-level csrc/
    there), the top-level csrc/ of a source tree (an editable install, or the repository on the path)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    return package / "csrc"  # absent: the build fails and says which file is missing


CSRC = _sources_directory()
ENV_SWITCH = "MODE_KERNELS_NATIVE"


class NativeUnavailable(RuntimeError):
    """The native backend is switched off or could not be built; the message says why."""


def disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"


def cache_root() -> Path:
    return cache_dir() / "native"


def _cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fno-math-errno"]
    # at::vec picks its AVX2 implementation (Sleef exp, 8 floats a lane) from these macros, as torch's own
    # kernels do; libtorch_cpu exports the Sleef functions it calls.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


# The library's name: its file (mode_kernels_native.so) and its operators' namespace (torch.ops.mode_kernels_native).
MODULE_NAME = "mode_kernels_native"
# torch.ops.mode_kernels_native: the kernels as attributes (routed_lora_forward, ...), called like functions.
Operators = Any


def source_hash() -> str:
    """What a build is built from: the sources, the flags, torch, python and the CPU's capability."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    for part in (torch.__version__, sys.version, torch.backends.cpu.get_cpu_capability(), *_cflags()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def build_directory() -> Path:
    """One directory per checkout of csrc/ and torch version, so a source change rebuilds incrementally
    (ninja) and two checkouts never overwrite each other's build."""
    where = hashlib.sha256(str(CSRC).encode()).hexdigest()[:12]
    return cache_root() / f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{where}"


def _load(library: Path) -> Operators:
    """The operators of a built library, loaded into this process (loading registers them, so only once)."""
    if str(library) not in torch.ops.loaded_libraries:
        torch.ops.load_library(str(library))
    return getattr(torch.ops, MODULE_NAME)


def _import_built(directory: Path, wanted: str) -> Operators | None:
    """The built operators if they were built from ``wanted`` sources, else None."""
    stamp = directory / "source.sha256"
    library = directory / f"{MODULE_NAME}.so"
    if not library.exists() or not stamp.exists() or stamp.read_text() != wanted:
        return None
    return _load(library)


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(verbose: bool = False) -> Operators:
    """Load the compiled kernels, compiling them first if these sources have no build yet."""
    wanted = source_hash()
    directory = build_directory()
    module = _import_built(directory, wanted)
    if module is not None:
        return module
    directory.mkdir(parents=True, exist_ok=True)
    with _file_lock(directory / "build.lock"):
        module = _import_built(directory, wanted)  # another process built it while we waited
        if module is not None:
            return module
        from torch.utils.cpp_extension import load
        # Compiling takes minutes on a small machine: say so, so a first test run does not look hung.
        print(f"mode_kernels.native: compiling {CSRC} into {directory} (once per source version)", file=sys.stderr)
        start = time.perf_counter()
        # is_python_module=False: a plain shared library of operators (no Python bindings), which load() loads
        library = load(name=MODULE_NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=_cflags(),
                       build_directory=str(directory), verbose=verbose, is_python_module=False)
        (directory / "source.sha256").write_text(wanted)
        module = _load(Path(library))
        print(f"mode_kernels.native: built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return module


_module: Operators | None = None
_failure: str | None = None


def extension() -> Operators:
    """The compiled kernels (torch.ops.mode_kernels_native); raises NativeUnavailable (with the reason) when
    they are off or cannot be built.

    The first failure warns once and is remembered: later calls raise at once without rebuilding.
    """
    global _module, _failure
    if disabled():
        raise NativeUnavailable(f"the native backend is switched off ({ENV_SWITCH}=0)")
    if _module is not None:
        return _module
    if _failure is None:
        try:
            _module = build()
            return _module
        except Exception as exc:  # noqa: BLE001 - any build failure (no compiler, no ninja, bad flags) falls back
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            _failure = f"building the native CPU kernels failed ({type(exc).__name__}: {first_line})"
            warnings.warn(f"mode_kernels: {_failure}; backend='auto' uses the torch reference on CPU. "
                          f"Run `python -m mode_kernels.native build` to see the compiler's output, or set "
                          f"{ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=3)
    raise NativeUnavailable(_failure)


def available() -> bool:
    """Whether the native kernels are switched on and built (building them on first call)."""
    try:
        extension()
    except NativeUnavailable:
        return False
    return True
