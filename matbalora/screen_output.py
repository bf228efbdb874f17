"""The resumable output of ``screen``: a CSV of finished rows, its settings record and its lock.

``out.csv``            the rows, appended one chunk per write; strings always quoted, so ids with
                       commas, quotes, ``\\n`` or ``\\r`` survive (``csv.QUOTE_NONNUMERIC``);
``out.csv.settings.json``  the run settings the rows were computed with (written before the first row);
``out.csv.lock``       held with ``flock`` by the one screen writing ``out.csv``; a second is refused.

On resume every complete record is kept (a record torn by a kill mid-write is cut off), and the
settings of the new run must equal the recorded ones (a setting missing from the record counts as None).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from matbalora.atomic import write_json

log = logging.getLogger(__name__)

#: Columns read back as strings (an empty cell is "", never NaN); every other column is numeric.
TEXT_COLUMNS = ("id", "formula", "error", "note", "warning")
INT_COLUMNS = ("n_atoms",)


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def to_csv_text(frame: pd.DataFrame, *, header: bool) -> str:
    """CSV text of ``frame``: ``\\n`` line ends, every string quoted (also those holding ``\\r``)."""
    return frame.to_csv(index=False, header=header, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")


def _complete_records(data: bytes) -> tuple[list[list[str]], list[int]]:
    """The CSV records of ``data`` and the byte offset after each; a torn last record is left out
    (no final ``\\n``, an unclosed quote, a short row, or bytes that are not UTF-8)."""
    pieces = [p + b"\n" for p in data.split(b"\n")[:-1]]  # what follows the last \n is torn
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for piece in pieces:
            consumed += len(piece)
            yield piece.decode("utf-8")

    records: list[list[str]] = []
    ends: list[int] = []
    try:
        for record in csv.reader(lines(), strict=True):  # pulls one line at a time: consumed ends this record
            if records and len(record) != len(records[0]):
                break
            records.append(record)
            ends.append(consumed)
    except (csv.Error, UnicodeDecodeError):
        pass
    return records, ends


def read_rows(out: Path) -> pd.DataFrame | None:
    """The complete rows of ``out`` (None when it holds no header); the file is cut back to them."""
    if not out.is_file():
        return None
    data = out.read_bytes()
    records, ends = _complete_records(data)
    if not records:
        out.unlink()
        return None
    if ends[-1] < len(data):
        with open(out, "r+b") as fh:
            fh.truncate(ends[-1])
    columns = records[0]
    text = {c: str for c in columns if c in TEXT_COLUMNS}
    ints = {c: "Int64" for c in columns if c in INT_COLUMNS}
    numeric = [c for c in columns if c not in TEXT_COLUMNS]
    with open(out, "rb") as fh:
        frame = pd.read_csv(fh, dtype={**text, **ints}, keep_default_na=False, na_values={c: [""] for c in numeric})
    return frame


def append_rows(out: Path, frame: pd.DataFrame, *, header: bool) -> None:
    """Append ``frame`` in one write and fsync (``header``: start the file anew with a header)."""
    with open(out, "w" if header else "a", encoding="utf-8", newline="") as fh:
        fh.write(to_csv_text(frame, header=header))
        fh.flush()
        os.fsync(fh.fileno())


def _shown(value: Any) -> str:
    return "none" if value is None else value if isinstance(value, str) else json.dumps(value)


def check_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to resume ``out`` under other ``settings`` than its rows were computed with."""
    path = settings_path(out)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{out} has rows but no record of their settings ({path.name} is missing); use a new out file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a settings record ({exc}); use a new out file") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: not a settings record; use a new out file")
    current = json.loads(json.dumps(dict(settings)))  # the values as they would be recorded
    differ = [k for k in sorted(recorded.keys() | current.keys()) if recorded.get(k) != current.get(k)]
    if differ:
        changes = ", ".join(f"{k}={_shown(recorded.get(k))} there, {_shown(current.get(k))} now" for k in differ)
        raise ValueError(
            f"{out} was written with other settings ({changes}); rerun with the same settings to resume, or use a new out file"
        )


def record_settings(out: Path, settings: Mapping[str, Any]) -> None:
    write_json(settings_path(out), dict(settings))


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock file (``flock``) for the block; RuntimeError if another process holds it.

    The lock file is removed on release; a process that locked a file removed meanwhile tries again,
    so two processes can never both believe they hold the lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        log.warning("no file locking on this platform: do not run two screens on %s at once", out)
        yield
        return
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise RuntimeError(
                f"{out} is being written by another screen (process {holder or 'unknown'}, lock {path.name}); "
                "wait for it to finish, or use another out file"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def of_other_inputs(frame: pd.DataFrame, ids: Sequence[str]) -> bool:
    """True unless the rows of ``frame`` are the first rows of ``ids``, in order."""
    if "id" not in frame or len(frame) > len(ids):
        return True
    return frame["id"].astype(str).tolist() != [str(i) for i in ids[: len(frame)]]


__all__ = ["append_rows", "check_settings", "exclusive", "of_other_inputs", "read_rows", "record_settings", "to_csv_text"]
