"""Fast extended-XYZ reading (plain or gzip) into ASE Atoms, one frame at a time.

The file is streamed forwards once: ASE's own reader seeks backwards, and every backward seek in
a gzip stream restarts decompression (hours for 100k frames). Frames are cut at their atom-count
lines and parsed one by one with ASE's extended-XYZ frame parser, so one bad frame does not lose
the file, ``limit`` stops reading early, and oversized frames are skipped without being parsed.
Lines and gzip's decompressed size are bounded while streaming (``matbalora.data.bounded``).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ase import Atoms

from matbalora.data.bounded import open_text, read_line


@dataclass(frozen=True)
class RawFrame:
    """One frame's text. ``index``: 0-based position in the file; ``natoms``: declared atom count;
    ``comment``: the info line; ``text``: the whole frame, or None when it was skipped unparsed."""

    index: int
    natoms: int
    comment: str
    text: str | None


def iter_frames(
    path: str | os.PathLike, *, limit: int | None = None, skip_above: int | None = None
) -> Iterator[RawFrame]:
    """The raw frames of an extended-XYZ file, streamed.

    ``limit``: stop after this many frames (the rest of the file is not read);
    ``skip_above``: frames declaring more atoms are returned with ``text=None`` (lines skipped).
    Raises ValueError when a frame boundary cannot be found (a count line that is not a
    non-negative integer, or the file ending inside a frame): later frames cannot be located;
    ``bounded.InputTooLarge`` (a ValueError) for a line or a decompressed size above its bound.
    """
    path = os.fspath(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}; must be >= 0 or None")
    with open_text(path) as fh:
        index = 0
        while limit is None or index < limit:
            header = read_line(fh, path)
            if not header:
                return
            if not header.strip():
                continue  # blank separator lines between frames
            try:
                natoms = int(header)
            except ValueError:
                natoms = -1
            if natoms < 0:
                raise ValueError(
                    f"{path}: frame {index}: expected an atom-count line, got {header.strip()[:60]!r}; "
                    "later frames cannot be located"
                )
            comment = read_line(fh, path)
            if not comment:
                raise ValueError(f"{path}: file ends inside frame {index} (no comment line)")
            skip = skip_above is not None and natoms > skip_above
            lines = [] if skip else [header, comment]
            for _ in range(natoms):
                line = read_line(fh, path)
                if not line:
                    raise ValueError(f"{path}: file ends inside frame {index} (declares {natoms} atoms)")
                if not skip:
                    lines.append(line)
            yield RawFrame(index, natoms, comment.rstrip("\r\n"), None if skip else "".join(lines))
            index += 1


def parse_comment(comment: str) -> dict:
    """The key=value pairs of an extended-XYZ info line (ASE's parser)."""
    from ase.io.extxyz import key_val_str_to_dict

    return key_val_str_to_dict(comment) if comment.strip() else {}


_PROPERTIES = re.compile(r'(?i)(?:^|\s)properties\s*=\s*(?:"([^"]*)"|(\S+))')


def check_columns(frame: RawFrame) -> None:
    """ValueError when the ``Properties`` of the info line declare more columns than the first atom
    line holds (ASE fails on such a frame too, but only after allocating every declared column:
    ``x:R:100000000`` costs gigabytes)."""
    found = _PROPERTIES.search(frame.comment)
    if found is None or frame.text is None or frame.natoms == 0:
        return
    fields = (found.group(1) if found.group(1) is not None else found.group(2)).split(":")
    try:
        declared = sum(int(count) for count in fields[2::3])
    except ValueError:
        return  # ASE reports the malformed declaration itself
    first_atom = frame.text.split("\n", 3)[2] if frame.text.count("\n") >= 2 else ""
    found_columns = len(first_atom.split())
    if declared > found_columns:
        raise ValueError(
            f"frame {frame.index}: Properties declare {declared} columns, the first atom line has {found_columns}"
        )


def parse_frame(frame: RawFrame) -> Atoms:
    """ASE Atoms of one raw frame; raises ValueError naming the frame on malformed content."""
    from ase.io.extxyz import read_xyz

    if frame.text is None:
        raise ValueError(f"frame {frame.index} was skipped unparsed ({frame.natoms} atoms)")
    check_columns(frame)
    try:
        return next(read_xyz(io.StringIO(frame.text), 0))
    except Exception as exc:  # ASE raises XYZError, ValueError, IndexError, KeyError, ...
        raise ValueError(f"frame {frame.index}: {type(exc).__name__}: {exc}") from exc


def read_extxyz(path: str | os.PathLike, *, limit: int | None = None) -> list[Atoms]:
    """All frames of an ``.extxyz`` or ``.extxyz.gz`` file.

    ``limit`` keeps only the first ``limit`` frames (the rest of the file is not read).
    Raises ValueError on the first malformed frame.
    """
    return [parse_frame(frame) for frame in iter_frames(path, limit=limit)]


def write_extxyz(dataset, path: str | os.PathLike, *, id_key: str = "material_id", target_key: str = "band_gap") -> int:
    """Write a ``BandGapDataset`` as extended XYZ (gzip when ``path`` ends in ``.gz``), one frame per
    entry with ``id_key`` and ``target_key`` (eV) in its info line, as ``matbalora train --data`` and
    ``load_dataset`` read it. Written to a temporary file and renamed, so ``path`` is never half written.
    Returns the number of frames."""
    import gzip
    import tempfile
    from pathlib import Path

    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    path = Path(path)
    buf = io.StringIO()
    for sid, structure, gap in zip(dataset.ids, dataset.structures, dataset.targets):
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info = {id_key: str(sid), target_key: float(gap)}
        write(buf, atoms, format="extxyz")
    data = buf.getvalue().encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(dataset)
