"""File access shared by ``nup train``, ``nup sweep``, ``nup report`` and ``nup bench``.

Writers never follow a link: a JSON, text or PNG file is written to a temporary file in the same
directory, flushed to disk and renamed over the target (so a reader sees the old file or the new
one, never half of one, and a symlink planted at the target is replaced, its target untouched);
an appended log is opened as a new file after removing whatever was at its path. Names that come
from a config or a results file (a sweep name, a run id) must be one plain file name, and paths
built from them below an output directory must not pass through a symlink.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)  # read once at import (setting it is process-wide, so never per call)
os.umask(_UMASK)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def safe_name(name: Any, what: str) -> str:
    """``name`` itself when it is one plain file name; ValueError otherwise (``what`` names it).

    Refused: non-strings, blank names, ``.`` and ``..``, ``/`` or ``\\`` anywhere, control characters.
    """
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or not name.isprintable()):
        raise ValueError(f"{what} {name!r} must be one plain file name (no '/', '\\', '..' or control "
                         "characters); rename it")
    return name


def inside(base: str | Path, *names: str, what: str = "name") -> Path:
    """``base/names[0]/…``, each name checked by :func:`safe_name`, none of them an existing symlink.

    Raises ValueError for a bad name or a link below ``base`` (``base`` itself is the user's choice).
    """
    path = Path(base)
    for i, name in enumerate(names):
        path = path / safe_name(name, what)
        if path.is_symlink():
            shown = "/".join(names[: i + 1])
            raise ValueError(f"{base}: {shown} is a symbolic link; nup does not follow links inside its "
                             "directories: remove it")
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file + fsync + ``os.replace`` (a link at ``path`` is replaced)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`write_bytes_atomic`."""
    if not isinstance(text, str):
        raise TypeError(f"write_text_atomic needs a str, got {type(text).__name__}")
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (non-finite floats are allowed)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def open_new_text(path: str | Path) -> IO[str]:
    """Open ``path`` for writing (UTF-8) as a new file: whatever was there, a symlink included, is removed first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    return os.fdopen(fd, "w", encoding="utf-8")


def open_append_text(path: str | Path) -> IO[str]:
    """Open an existing regular file for appending (UTF-8); OSError when ``path`` is a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_lock_file(path: str | Path) -> IO[str]:
    """Open (create) a lock file without truncating it; a symlink at ``path`` is removed first."""
    if Path(path).is_symlink():
        os.unlink(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | _NOFOLLOW, 0o666), "w")


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree, or only the link when ``path`` is a symlink (its target is kept)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def read_bytes_no_follow(path: str | Path) -> bytes:
    """The bytes of a regular file; OSError when ``path`` is a symlink."""
    if Path(path).is_symlink():
        raise OSError(f"{path} is a symbolic link; nup does not read through links: remove it")
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err}); regenerate it or remove it") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; regenerate it or remove it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(obj).__name__}; regenerate it or remove it")
    return obj


def append_jsonl(fh: IO[str], obj: Any) -> None:
    """Append ``obj`` to an open text file as one compact JSON line and flush it."""
    fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
    fh.flush()
