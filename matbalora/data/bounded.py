"""Text inputs read with their bounds checked while streaming: decompressed size and line length.

A gzip stream can expand a thousandfold (611 kB of gzip hold a 600 MB line), so a ``.gz`` input may
decompress to at most ``max(MIN_GZIP_BYTES, MAX_GZIP_RATIO x its compressed size)`` bytes: real
structure files compress 3-5x (``mp_gap.extxyz.gz``: 3.5x), and a larger file read uncompressed is
bounded by its own size. Lines are read with a length cap (the longest line of ``mp_gap`` has 304
characters), so no single line is ever held whole above ``MAX_LINE_CHARS``. Both refusals raise
``InputTooLarge`` (a ValueError) naming the file, as soon as the bound is crossed.
"""

from __future__ import annotations

import gzip
import io
import os
from typing import IO

#: Characters one line of a streamed input may hold.
MAX_LINE_CHARS = 1 << 20
#: A gzip input may decompress to this many times its compressed size ...
MAX_GZIP_RATIO = 50
#: ... or to this many bytes, whichever is larger.
MIN_GZIP_BYTES = 8 << 20


class InputTooLarge(ValueError):
    """An input crossed a size bound while it was read; the message names the file and the bound."""


def gzip_cap(path: str | os.PathLike) -> int:
    """Decompressed bytes a gzip file may hold: ``max(MIN_GZIP_BYTES, MAX_GZIP_RATIO x size)``."""
    return max(MIN_GZIP_BYTES, MAX_GZIP_RATIO * os.path.getsize(path))


class _Capped(io.RawIOBase):
    """A readable stream that raises InputTooLarge once more than ``cap`` bytes came through."""

    def __init__(self, raw: IO[bytes], cap: int, what: str) -> None:
        self._raw, self._cap, self._what, self.total = raw, cap, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        self.total += n
        if self.total > self._cap:
            raise InputTooLarge(f"{self._what} is larger than {self._cap} bytes {_why(self._what)}")
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _why(what: str) -> str:
    if what.endswith("decompressed"):
        return f"(at most {MAX_GZIP_RATIO}x the compressed size or {MIN_GZIP_BYTES >> 20} MiB; gunzip it to read it anyway)"
    return "(too large for this input)"


def open_text(path: str | os.PathLike, *, max_bytes: int | None = None) -> io.TextIOWrapper:
    """UTF-8 text of a plain or ``.gz`` file; reading past ``max_bytes`` (decompressed) or past the
    gzip cap raises InputTooLarge."""
    path = os.fspath(path)
    if path.lower().endswith(".gz"):
        cap = gzip_cap(path) if max_bytes is None else min(max_bytes, gzip_cap(path))
        raw: IO[bytes] = _Capped(gzip.open(path, "rb"), cap, f"{path} decompressed")
    elif max_bytes is not None:
        raw = _Capped(open(path, "rb"), max_bytes, path)  # noqa: SIM115 - closed with the wrapper
    else:
        return open(path, encoding="utf-8")  # noqa: SIM115 - the caller closes it
    return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")


def read_line(fh: io.TextIOBase, path: str | os.PathLike) -> str:
    """The next line of ``fh`` ('' at the end); InputTooLarge when it is longer than MAX_LINE_CHARS."""
    line = fh.readline(MAX_LINE_CHARS + 1)
    if len(line) > MAX_LINE_CHARS:
        raise InputTooLarge(f"{os.fspath(path)}: a line longer than {MAX_LINE_CHARS} characters")
    return line
