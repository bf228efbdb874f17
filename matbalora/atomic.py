"""Atomic file writes: write a temporary file in the same folder, fsync, then ``os.replace``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, durable: bool = True) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step.

    The file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask),
    not the owner-only 0o600 of a temporary file, so shared model folders stay readable.
    ``durable``: fsync the file and its folder, so the write survives a power cut (off for caches
    that are rebuilt when an entry is missing: one fsync per small file dominates their cost).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after write: a writer may replace the file itself
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)  # the rename itself survives a power cut
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, _write, durable=durable)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, _write, durable=durable)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> None:
    """``data`` as JSON (numpy scalars and arrays, and paths, converted; ``default`` for other types)."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=False, default=default or _json_default) + ("\n" if indent is not None else ""))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
