"""Load band-gap datasets and prediction inputs from local files.

``load_dataset`` dispatches on the path: an extended-XYZ file (``.extxyz``, ``.xyz``, ``.gz``);
a pymatgen JSON file; a single CIF/POSCAR file; or a folder of CIF/POSCAR/CONTCAR/``.vasp``/JSON
files with one CSV of ``id,band_gap`` (id = file name without extension).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from matbalora.data.dataset import BandGapDataset, Rejection
from matbalora.data.doubtful import WARNING, order_entry, parser_warnings, warning_text
from matbalora.data.entries import Checks, Entry, admit_structures, build_dataset
from matbalora.data.formats import (
    FORMATS,
    csv_target,
    detect_format,
    file_entries,
    file_id,
    read_targets_csv,
)
from matbalora.data.validation import (
    DEFAULT_CUTOFF,
    DEFAULT_MAX_ATOMS,
    DEFAULT_MIN_DISTANCE,
    MISSING_STRUCTURE,
    OnInvalid,
    check_policy,
)

#: Formats allowed inside a dataset folder (multi-frame extxyz files carry their own targets).
FOLDER_FORMATS = ("cif", "poscar", "json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_limit(max_structures: int | None) -> None:
    if max_structures is not None and (not isinstance(max_structures, int) or max_structures < 0):
        raise ValueError(f"max_structures={max_structures!r}; must be a non-negative integer or None")


def _folder_entries(
    folder: Path, *, id_key: str, target_key: str, limit: int | None, max_atoms: int, require_target: bool
) -> tuple[Iterator[Entry], dict[str, Any]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and detect_format(p) in FOLDER_FORMATS)
    csvs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if len(csvs) > 1:
        raise ValueError(
            f"folder {os.fspath(folder)!r} has {len(csvs)} CSV files {[p.name for p in csvs]}; expected one"
        )
    if not csvs and require_target:
        raise ValueError(
            f"folder {os.fspath(folder)!r} has no CSV of targets ('id,{target_key}'); "
            "pass require_target=False to read structures without band gaps"
        )
    if not files:
        raise ValueError(f"folder {os.fspath(folder)!r} holds no structure files ({list(FOLDER_FORMATS)})")
    targets = read_targets_csv(csvs[0], target_key=target_key, id_key=id_key) if csvs else {}
    meta = {"n_files": len(files), "targets_csv": csvs[0].name if csvs else None}

    def generate() -> Iterator[Entry]:
        seen: set[str] = set()
        n = 0
        for path in files:
            for entry in file_entries(path, id_key=id_key, target_key=target_key, limit=None, max_atoms=max_atoms):
                if limit is not None and n >= limit:
                    return
                n += 1
                seen.add(entry.id)
                if entry.id in targets:
                    entry = Entry(entry.id, entry.structure, csv_target(targets[entry.id]), entry.failure)
                yield entry
        if limit is None:
            for key in targets.keys() - seen:
                detail = f"listed in {csvs[0].name} but no structure file"
                yield Entry(key, None, csv_target(targets[key]), (MISSING_STRUCTURE, detail))

    return generate(), meta


def load_dataset(
    path: str | os.PathLike,
    *,
    on_invalid: OnInvalid = "skip",
    max_structures: int | None = None,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    target_key: str = "band_gap",
    id_key: str = "material_id",
    require_target: bool = True,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float = DEFAULT_CUTOFF,
) -> BandGapDataset:
    """A validated BandGapDataset from a local file or folder.

    ``max_structures``: read only the first N entries of the source (the rest is not parsed);
    ``max_atoms``, ``min_distance`` (Å), ``cutoff`` (Å): validation limits, see
    ``validation.check_structure``; ``require_target=False`` keeps entries without a band gap
    (target NaN) for prediction; ``on_invalid``: 'error' raises ValueError on the first bad entry,
    'skip' records it in ``dataset.rejected``, 'warn' also logs it.
    """
    check_policy(on_invalid)
    _check_limit(max_structures)
    checks = Checks(max_atoms=max_atoms, min_distance=min_distance, cutoff=cutoff)
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"dataset path {os.fspath(path)!r} does not exist")
    provenance: dict[str, Any] = {"source": os.fspath(source.resolve()), "max_structures": max_structures}
    provenance["target_key"] = target_key
    if source.is_dir():
        entries, meta = _folder_entries(
            source,
            id_key=id_key,
            target_key=target_key,
            limit=max_structures,
            max_atoms=max_atoms,
            require_target=require_target,
        )
        provenance.update(format="folder", **meta)
    else:
        fmt = detect_format(source)
        if fmt is None:
            raise ValueError(f"cannot tell the format of {os.fspath(path)!r}; supported: folder or {list(FORMATS)}")
        entries = file_entries(source, id_key=id_key, target_key=target_key, limit=max_structures, max_atoms=max_atoms)
        provenance.update(format=fmt, sha256=_sha256(source))
    return build_dataset(
        islice(entries, max_structures) if max_structures is not None else entries,
        provenance=provenance,
        on_invalid=on_invalid,
        require_target=require_target,
        checks=checks,
    )


def _input_files(paths: Sequence[str | os.PathLike]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and detect_format(p) is not None)
            if not files:
                raise ValueError(f"folder {os.fspath(raw)!r} holds no structure files ({list(FORMATS)})")
            yield from files
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"input path {os.fspath(raw)!r} does not exist")


def read_structures(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float = DEFAULT_CUTOFF,
    id_key: str = "material_id",
    order: bool = False,
) -> list[tuple[str, Any]]:
    """Prediction inputs: ``(id, Structure | Rejection)`` for every structure found, in order.

    ``paths``: one or more files or folders (not recursed) of CIF, POSCAR/CONTCAR/``.vasp``,
    extended XYZ or pymatgen JSON. Single-structure files are named by their file name without
    extension, frames and records by their ``id_key``/``id`` or ``<file>#<position>``. Structures
    failing validation come back as a Rejection instead of a Structure, never dropped. ``order``:
    a disordered structure becomes an ordered approximant; pymatgen's warnings about a file are in
    its structure's ``properties["warning"]`` (``matbalora.data.doubtful``).
    """
    checks = Checks(max_atoms=max_atoms, min_distance=min_distance, cutoff=cutoff)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]

    def entries() -> Iterator[Entry]:
        for path in _input_files(paths):
            for entry in file_entries(path, id_key=id_key, target_key="", limit=None, max_atoms=max_atoms):
                said = warning_text(warned.pop(os.fspath(path), []))
                if said and entry.structure is not None:
                    entry.structure.properties = {**(entry.structure.properties or {}), WARNING: said}
                yield order_entry(entry, max_atoms=max_atoms) if order else entry

    with parser_warnings() as warned:
        return admit_structures(entries(), checks=checks)


__all__ = ["Rejection", "file_id", "load_dataset", "read_structures"]
