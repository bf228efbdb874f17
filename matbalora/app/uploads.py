"""Uploads in: files -> checked structures (``Item``), under the bounds of ``Limits``, and the
built-in example crystals.

Uploaded file names are labels, never paths: the bytes are parsed from a private temporary folder
under a name chosen here. What a page may cost is bounded by ``Limits``: files per page, bytes per
file (``.gz`` uploads also after decompression), structures, atoms, and the seconds spent parsing
each upload and predicting a page.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matbalora.data.dataset import Rejection
from matbalora.data.formats import detect_format, file_id

if TYPE_CHECKING:
    from pymatgen.core import Structure

ACCEPTED = "CIF (.cif), POSCAR/CONTCAR (.vasp, .poscar, or a name starting with POSCAR/CONTCAR), extended XYZ (.extxyz, .xyz), pymatgen JSON (.json); optionally gzipped (.gz)"


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; the app states these next to the uploader."""

    max_file_mb: int = 2  # per uploaded file, MiB
    max_atoms: int = 200  # per structure
    max_structures: int = 50  # per page (all uploads and examples together)
    max_files: int = 20  # uploaded files read per page
    max_decompressed_mb: int = 16  # per .gz upload, after decompression, MiB
    max_parse_seconds: int = 20  # reading one upload stops after this (each structure's work is bounded too)
    max_predict_seconds: int = 120  # predicting one page stops after this (cached results cost nothing)

    def __post_init__(self) -> None:
        for name in ("max_file_mb", "max_atoms", "max_structures", "max_files", "max_decompressed_mb",
                     "max_parse_seconds", "max_predict_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; must be a positive integer")

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024

    def describe(self) -> str:
        return (f"Up to {self.max_files} files of {self.max_file_mb} MB ({self.max_decompressed_mb} MB once "
                f"decompressed), {self.max_atoms} atoms per structure, {self.max_structures} structures at a time; "
                "ordered crystals only (no partial occupancies).")


@dataclass(frozen=True)
class Item:
    """One structure found in an upload, or the upload itself when nothing usable was found.

    ``source``: the uploaded file's name (a label); ``id``: unique on the page; ``key``: SHA-256 of
    the structure (a cache key); ``error``: plain-language reason when ``structure`` is None.
    """

    source: str
    id: str
    structure: Structure | None = None
    key: str = ""
    error: str = ""


def display_name(name: str) -> str:
    """A file name fit to show: no folders, no control characters, at most 80 characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return (base or "upload")[:80]


_PLAIN = {
    "unparsable": "could not be read",
    "disordered": "is disordered (partial occupancies); the model needs an ordered crystal",
    "too_many_atoms": "has too many atoms",
    "empty": "holds no atoms",
    "bad_lattice": "has no usable periodic cell",
    "non_finite": "has NaN or infinite numbers",
    "overlapping_atoms": "has overlapping atoms",
    "isolated_atom": "has an atom with no neighbour within the model's 6 Å cutoff",
    "duplicate_id": "repeats an earlier structure id",
}


def explain(rejection: Rejection) -> str:
    """One plain sentence for a reader's Rejection."""
    text = _PLAIN.get(rejection.reason, rejection.reason)
    return f"{text} ({rejection.detail})" if rejection.detail else text


def structure_key(structure: Structure) -> str:
    return hashlib.sha256(structure.to_json().encode()).hexdigest()


def _gunzip(data: bytes, limit: int) -> bytes | None:
    """The decompressed bytes of a gzip upload, or None when they exceed ``limit`` (read in
    blocks, so a gzip bomb never grows past the limit in memory)."""
    out = bytearray()
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
        while block := fh.read(1 << 20):
            out += block
            if len(out) > limit:
                return None
    return bytes(out)


def _until(deadline: float, entries, stopped: list[bool]):
    """``entries`` until ``time.monotonic()`` passes ``deadline`` (then ``stopped[0]`` is True)."""
    for entry in entries:
        yield entry
        if time.monotonic() > deadline:
            stopped[0] = True
            return


def read_upload(name: str, data: bytes, *, limits: Limits = Limits()) -> list[Item]:
    """The structures in one uploaded file, each checked; a bad file gives one Item with ``error``.
    A ``.gz`` upload is decompressed first, up to ``limits.max_decompressed_mb``; reading stops
    after ``limits.max_parse_seconds`` (an Item says so)."""
    from matbalora.data.entries import Checks, admit_structures
    from matbalora.data.formats import file_entries

    label = display_name(name)
    stem = file_id(label)
    if len(data) > limits.max_file_bytes:
        return [Item(label, label, error=f"file is {len(data) / 2**20:.1f} MB; the limit is {limits.max_file_mb} MB")]
    fmt = detect_format(label)
    if fmt is None:
        return [Item(label, label, error=f"unknown file type; accepted: {ACCEPTED}")]
    if label.lower().endswith(".gz"):
        try:
            data = _gunzip(data, limits.max_decompressed_mb * 2**20)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            return [Item(label, label, error=f"could not be read (not a valid gzip file: {exc})")]
        if data is None:
            return [Item(label, label, error=f"decompresses to more than {limits.max_decompressed_mb} MB; "
                                             f"the limit is {limits.max_decompressed_mb} MB")]
    suffix = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz", "json": ".json"}[fmt]
    stopped = [False]
    with tempfile.TemporaryDirectory(prefix="matbalora-upload-") as tmp:  # private (0700), random name
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:  # read_structures, but stopping after max_structures + 1 entries of a multi-frame file
            entries = file_entries(path, id_key="material_id", target_key="", limit=limits.max_structures + 1,
                                   max_atoms=limits.max_atoms)
            deadline = time.monotonic() + limits.max_parse_seconds
            found = admit_structures(_until(deadline, entries, stopped), checks=Checks(max_atoms=limits.max_atoms))
        except (ValueError, OSError) as exc:
            found = [("upload", Rejection("upload", "unparsable", str(exc)))]
    items = []
    if len(found) > limits.max_structures:
        found = found[:limits.max_structures]
        items.append(Item(label, label, error=f"holds more than {limits.max_structures} structures; only the first {limits.max_structures} are used"))
    if stopped[0]:
        items.append(Item(label, label, error=f"reading stopped after {limits.max_parse_seconds} s; "
                                               f"only the first {len(found)} structures are used"))
    for sid, obj in found:
        sid = sid.replace(os.fspath(path), stem)
        sid = stem + sid[len("upload"):] if sid.startswith("upload") else sid
        if isinstance(obj, Rejection):
            detail = obj.detail.replace(os.fspath(path), label).replace(tmp, "")
            items.append(Item(label, sid, error=explain(Rejection(sid, obj.reason, detail))))
        else:
            items.append(Item(label, sid, obj, structure_key(obj)))
    return items or [Item(label, label, error="no structure found in the file")]


def read_uploads(files: Sequence[tuple[str, bytes]], *, limits: Limits = Limits(), read=None) -> list[Item]:
    """``read_upload`` of each ``(name, bytes)`` (``read``: a cached wrapper of it, default the
    function itself); files beyond ``limits.max_files`` are not read, each says so."""
    read = read or (lambda name, data: read_upload(name, data, limits=limits))
    items: list[Item] = []
    for n, (name, data) in enumerate(files):
        if n < limits.max_files:
            items.extend(read(name, data))
        else:
            label = display_name(name)
            items.append(Item(label, label, error=f"skipped: more than {limits.max_files} files at a time"))
    return items



def collect(items: Sequence[Item], *, limits: Limits = Limits()) -> list[Item]:
    """Ids made unique (``Si``, ``Si (2)``); structures beyond ``max_structures`` become errors."""
    seen: dict[str, int] = {}
    out, n_good = [], 0
    for item in items:
        n = seen[item.id] = seen.get(item.id, 0) + 1
        sid = item.id if n == 1 else f"{item.id} ({n})"
        if item.structure is not None:
            n_good += 1
            if n_good > limits.max_structures:
                item = Item(item.source, sid, error=f"skipped: more than {limits.max_structures} structures at a time")
        out.append(Item(item.source, sid, item.structure, item.key, item.error))
    return out


def _fcc(a: float):
    from pymatgen.core import Lattice

    return Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])  # primitive cell, Å


def _example(name: str) -> Structure:
    from pymatgen.core import Lattice, Structure

    if name == "β-Ga2O3 (monoclinic, 20 atoms)":  # conventional C2/m cell, all five sites 4i
        return Structure.from_spacegroup(
            "C2/m", Lattice.monoclinic(12.214, 3.0371, 5.7981, 103.83), ["Ga", "Ga", "O", "O", "O"],
            [[0.0904, 0, 0.7948], [0.3414, 0, 0.6857], [0.1674, 0, 0.1011], [0.4957, 0, 0.2553], [0.8279, 0, 0.4365]])
    cubic = {"SrTiO3 (cubic perovskite)": (Lattice.cubic(3.945), ["Sr", "Ti", "O", "O", "O"],
                                           [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])}
    fcc = {"Si (diamond)": (5.468, ["Si", "Si"], [[0, 0, 0], [0.25] * 3]),
           "GaAs (zinc blende)": (5.75, ["Ga", "As"], [[0, 0, 0], [0.25] * 3]),
           "NaCl (rock salt)": (5.69, ["Na", "Cl"], [[0, 0, 0], [0.5] * 3]),
           "Cu (fcc metal)": (3.63, ["Cu"], [[0, 0, 0]])}
    if name in fcc:
        a, species, coords = fcc[name]
        return Structure(_fcc(a), species, coords)
    return Structure(*cubic[name])


EXAMPLES: tuple[str, ...] = ("Si (diamond)", "GaAs (zinc blende)", "NaCl (rock salt)", "Cu (fcc metal)",
                             "SrTiO3 (cubic perovskite)", "β-Ga2O3 (monoclinic, 20 atoms)")


def example(name: str) -> Item:
    """A built-in example crystal (names in ``EXAMPLES``; experimental lattice constants)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {list(EXAMPLES)}")
    structure = _example(name)
    return Item("built-in example", name.split(" ")[0], structure, structure_key(structure))

