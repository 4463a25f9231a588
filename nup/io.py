"""Crash-safe file writers shared by ``nup train`` and ``nup sweep``.

A JSON or text file is written to a temporary file in the same directory, flushed to disk
and renamed over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)  # read once at import (setting it is process-wide, so never per call)
os.umask(_UMASK)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(binary file)`` on a temp file next to ``path``, fsync it and ``os.replace`` it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file + fsync + ``os.replace``."""
    write_atomic(path, lambda fh: fh.write(str.encode(text, "utf-8")))  # TypeError for non-str text


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (non-finite floats are allowed)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(fh: IO[str], obj: Any) -> None:
    """Append ``obj`` to an open text file as one compact JSON line and flush it."""
    fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
    fh.flush()
