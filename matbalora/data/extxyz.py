"""Fast extended-XYZ reading (plain or gzip) into ASE Atoms."""

from __future__ import annotations

import gzip
import io
import os

from ase import Atoms


def read_extxyz(path: str | os.PathLike, *, limit: int | None = None) -> list[Atoms]:
    """All frames of an ``.extxyz`` or ``.extxyz.gz`` file.

    A gzip file is decompressed in memory first: ASE's reader seeks backwards, and every backward
    seek in a gzip stream restarts decompression (hours for 100k frames).
    ``limit`` keeps only the first ``limit`` frames (read without parsing the rest).
    """
    from ase.io import read

    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    index = ":" if limit is None else f":{int(limit)}"
    frames = read(io.StringIO(text), index=index, format="extxyz")
    return list(frames)
