"""Load band-gap datasets and prediction inputs from local files.

``load_dataset`` dispatches on the path: an extended-XYZ file (``.extxyz``, ``.xyz``, ``.gz``);
a pymatgen JSON file; a single CIF/POSCAR file; or a folder of CIF/POSCAR/CONTCAR/``.vasp``/JSON
files with one CSV of ``id,band_gap`` (id = file name without extension).

Folders are not recursed. A folder entry that is not a regular file or a folder (a broken
symbolic link, a link loop, a FIFO, a socket, a device) becomes its own ``unreadable`` rejection,
and nothing is ever opened that is not a regular file (opening a FIFO waits for a writer forever).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

from matbalora.data.dataset import BandGapDataset, Rejection
from matbalora.data.doubtful import WARNING, order_entry, parser_warnings, warning_text
from matbalora.data.entries import Checks, Entry, admit_structures, build_dataset
from matbalora.data.formats import (
    FORMATS,
    clean_id,
    csv_target,
    detect_format,
    file_entries,
    file_id,
    read_targets_csv,
)
from matbalora.data.validation import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_ATOMS,
    DEFAULT_MIN_DISTANCE,
    MISSING_STRUCTURE,
    UNREADABLE,
    GraphLimits,
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


def path_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("is a folder" for a folder), or None for a regular
    file; ``os.stat`` only, nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link (its target does not exist)" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return "symbolic link loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return f"not a regular file ({next((name for test, name in kinds if test(mode)), 'special file')})"


def scan_folder(folder: Path, formats: Sequence[str] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """A folder's structure files (sorted; ``formats``: those allowed, default all) and its entries
    that are neither regular files nor folders, each with why (``path_problem``)."""
    files, problems = [], []
    for entry in sorted(folder.iterdir()):
        problem = path_problem(entry)
        if problem is None:
            fmt = detect_format(entry)
            if fmt is not None and (formats is None or fmt in formats):
                files.append(entry)
        elif problem != "is a folder":
            problems.append((entry, problem))
    return files, problems


def _unreadable(path: Path, problem: str, *, name: str | None = None) -> Entry:
    where = clean_id(os.fspath(path))
    return Entry(name or where, None, None, (UNREADABLE, problem), where)


def _check_limit(max_structures: int | None) -> None:
    if max_structures is not None and (not isinstance(max_structures, int) or max_structures < 0):
        raise ValueError(f"max_structures={max_structures!r}; must be a non-negative integer or None")


def _folder_entries(
    folder: Path, *, id_key: str, target_key: str, limit: int | None, max_atoms: int, require_target: bool
) -> tuple[Iterator[Entry], dict[str, Any]]:
    files, problems = scan_folder(folder, FOLDER_FORMATS)
    csvs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and path_problem(p) is None)
    if len(csvs) > 1:
        raise ValueError(
            f"folder {os.fspath(folder)!r} has {len(csvs)} CSV files {[p.name for p in csvs]}; expected one"
        )
    if not csvs and require_target:
        raise ValueError(
            f"folder {os.fspath(folder)!r} has no CSV of targets ('id,{target_key}'); "
            "pass require_target=False to read structures without band gaps"
        )
    if not files and not problems:
        raise ValueError(f"folder {os.fspath(folder)!r} holds no structure files ({list(FOLDER_FORMATS)})")
    targets = read_targets_csv(csvs[0], target_key=target_key, id_key=id_key) if csvs else {}
    meta = {"n_files": len(files), "targets_csv": csvs[0].name if csvs else None}

    def generate() -> Iterator[Entry]:
        seen: set[str] = set()
        n = 0
        for path, problem in problems:
            if limit is not None and n >= limit:
                return
            n += 1
            yield _unreadable(path, problem, name=file_id(path))
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
    cutoff: float | None = None,
    limits: GraphLimits = DEFAULT_LIMITS,
) -> BandGapDataset:
    """A validated BandGapDataset from a local file or folder.

    ``max_structures``: read only the first N entries of the source (the rest is not parsed);
    ``max_atoms``, ``min_distance`` (Å), ``cutoff`` (Å), ``limits`` (the backbone's cutoffs and
    elements, ``Backbone.limits``): validation limits, see ``validation.check_structure``; ``require_target=False`` keeps entries without a band gap
    (target NaN) for prediction; ``on_invalid``: 'error' raises ValueError on the first bad entry,
    'skip' records it in ``dataset.rejected``, 'warn' also logs it.
    """
    check_policy(on_invalid)
    _check_limit(max_structures)
    checks = Checks(max_atoms=max_atoms, min_distance=min_distance, cutoff=cutoff, limits=limits)
    source = Path(path)
    problem = path_problem(source)
    if problem in ("does not exist", "broken symbolic link (its target does not exist)"):
        raise FileNotFoundError(f"dataset path {os.fspath(path)!r}: {problem}")
    if problem not in (None, "is a folder"):
        raise ValueError(f"dataset path {os.fspath(path)!r}: {problem}")
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


def _input_files(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, str | None]]:
    """Every input file, with None, or with why it cannot be read (a path or a folder entry that is
    not a regular file, a folder without structure files): such paths are reported, never raised."""
    for raw in paths:
        path = Path(raw)
        problem = path_problem(path)
        if problem != "is a folder":
            yield path, problem
            continue
        files, problems = scan_folder(path)
        if not files and not problems:
            yield path, f"folder holds no structure files ({list(FORMATS)})"
        yield from problems
        yield from ((p, None) for p in files)


def _names(files: list[tuple[Path, str | None]]) -> dict[Path, str]:
    """The id (or id prefix) of each readable file: its ``file_id``, or its path when two inputs
    share that id (``a/Si.cif`` and ``b/Si.cif``), so that ids stay unique."""
    stems = Counter(file_id(p) for p, problem in files if problem is None)
    return {p: file_id(p) if stems[file_id(p)] == 1 else clean_id(os.fspath(p)) for p, problem in files if problem is None}


def read_structures(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float | None = None,
    id_key: str = "material_id",
    order: bool = False,
) -> list[tuple[str, Any]]:
    """Prediction inputs: ``(id, Structure | Rejection)`` for every structure found, in order.

    ``paths``: one or more files or folders (not recursed) of CIF, POSCAR/CONTCAR/``.vasp``,
    extended XYZ or pymatgen JSON. Single-structure files are named by their file name without
    extension, frames and records by their ``id_key``/``id`` or ``<file>#<position>``; when two
    input files share a name, their path takes its place. Structures failing validation, and paths
    that cannot be read (missing, broken links, FIFOs...), come back as a Rejection instead of a
    Structure, never dropped; its ``source`` is the file (``path#position`` in multi-entry files). ``order``:
    a disordered structure becomes an ordered approximant; pymatgen's warnings about a file are in
    its structure's ``properties["warning"]`` (``matbalora.data.doubtful``).
    """
    checks = Checks(max_atoms=max_atoms, min_distance=min_distance, cutoff=cutoff)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files = list(_input_files(paths))
    names = _names(files)

    def entries() -> Iterator[Entry]:
        for path, problem in files:
            if problem is not None:
                yield _unreadable(path, problem)
                continue
            where, single = clean_id(os.fspath(path)), detect_format(path) in ("cif", "poscar")
            found = file_entries(path, id_key=id_key, target_key="", limit=None, max_atoms=max_atoms, name=names[path])
            for k, entry in enumerate(found):
                said = warning_text(warned.pop(os.fspath(path), []))
                if said and entry.structure is not None:
                    entry.structure.properties = {**(entry.structure.properties or {}), WARNING: said}
                entry = order_entry(entry, max_atoms=max_atoms) if order else entry
                yield replace(entry, source=where if single else f"{where}#{k}")

    with parser_warnings() as warned:
        return admit_structures(entries(), checks=checks)


__all__ = ["Rejection", "file_id", "load_dataset", "read_structures"]
