"""Reading a JSON file so that every failure names the file (and the line of a parse error)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; ValueError "PATH:LINE: not valid JSON (reason at column C)" for text that
    does not parse or is not UTF-8, OSError (naming the file, as ``open`` does) for a file that cannot be read."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
