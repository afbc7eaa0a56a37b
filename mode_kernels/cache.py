"""The one directory where mode-kernels keeps what it builds for a user: the native CPU kernels
(``native/``) and the digits benchmark's pretrained models."""
from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE_DIR = "MODE_CACHE_DIR"


def cache_dir() -> Path:
    """``$MODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mode-kernels``, else ``~/.cache/mode-kernels``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mode-kernels"
