"""Per-format readers: each turns one file into Entry records (never raising on bad content).

Formats: extended XYZ (``.extxyz``, ``.xyz``, optionally ``.gz``), CIF, POSCAR/CONTCAR/``.vasp``,
and pymatgen JSON (one Structure dict, one ``{"structure": ...}`` record, or a list of either).
JSON is decoded with ``json`` and built from plain values (``structure_dict``: no MontyDecoder class
lookup, no pickle). Every read is bounded (``bounded``: gzip's decompressed size, line length;
``MAX_JSON_CHARS``, ``precheck.MAX_TEXT_CHARS``). Ids never hold control characters (``clean_id``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from matbalora.data.bounded import open_text
from matbalora.data.entries import Entry
from matbalora.data.extxyz import iter_frames, parse_comment, parse_frame
from matbalora.data.precheck import MAX_TEXT_CHARS, cif_problem, poscar_problem
from matbalora.data.structure_dict import structure_from_dict
from matbalora.data.validation import BAD_LATTICE, EMPTY, TOO_MANY_ATOMS, UNPARSABLE, check_cheap

log = logging.getLogger(__name__)

#: File-name endings (lower case, after removing ``.gz``) and their format.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".extxyz", "extxyz"),
    (".xyz", "extxyz"),
    (".cif", "cif"),
    (".vasp", "poscar"),
    (".poscar", "poscar"),
    (".json", "json"),
)
FORMATS: tuple[str, ...] = ("extxyz", "cif", "poscar", "json")
#: Characters of one JSON file (parsed whole: about 10x this in memory); larger collections: extxyz.
MAX_JSON_CHARS = 32 * 2**20
#: Characters of an id; longer ids are cut (and then may repeat: a duplicate_id rejection).
MAX_ID_CHARS = 256
#: Entries one file may fail to read; then the rest of the file is not read (one more entry says
#: so). Bounds the memory of a file of millions of 3-byte frames ("0\n\n") to about 60 MB.
MAX_FAILED_ENTRIES = 100_000
#: Distinct parser warnings kept per CIF/POSCAR file (they become the structure's warning note).
MAX_NOTES = 20


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped: a newline becomes ``\\n``."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def clean_id(text: str) -> str:
    """``escape(text)``, at most MAX_ID_CHARS long: an id can never start a fake line of its own
    in a message or a table."""
    text = escape(text)
    return text if len(text) <= MAX_ID_CHARS else text[: MAX_ID_CHARS - 3] + "..."


def _base_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    return name[:-3] if name.lower().endswith(".gz") else name


def detect_format(path: str | os.PathLike) -> str | None:
    """``extxyz``, ``cif``, ``poscar`` or ``json`` from the file name, or None."""
    base = _base_name(path)
    lower = base.lower()
    for suffix, fmt in SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    if base.upper().startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    return None


def file_id(path: str | os.PathLike) -> str:
    """The entry id of a single-structure file: its name without ``.gz`` and known extension."""
    base = _base_name(path)
    for suffix, _ in SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return clean_id(base[: -len(suffix)])
    return clean_id(base)


def read_text(path: str | os.PathLike, *, max_chars: int | None = None) -> str:
    """The file's text (gzip-decompressed for ``.gz``, within ``bounded.gzip_cap``); ValueError
    above ``max_chars`` characters."""
    with open_text(path) as fh:
        text = fh.read() if max_chars is None else fh.read(max_chars + 1)
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"file holds more than {max_chars} characters; too large for one structure")
    return text


def _failed(entry_id: str, reason: str, detail: str, target: Any = None) -> Entry:
    return Entry(entry_id, None, target, (reason, detail))


def atoms_entry(atoms, entry_id: str, *, target_key: str, max_atoms: int) -> Entry:
    """Entry of an ASE Atoms (cheap checks first, then AseAtomsAdaptor)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    target = atoms.info.get(target_key)
    cell = atoms.cell.array if np.all(atoms.pbc) else None
    cheap = check_cheap(len(atoms), cell, atoms.positions, max_atoms=max_atoms)
    if cheap is not None:
        reason, detail = cheap
        if reason == BAD_LATTICE and cell is None:
            detail = f"not periodic in all three directions (pbc={atoms.pbc.tolist()})"
        return _failed(entry_id, reason, detail, target)
    try:
        structure = AseAtomsAdaptor.get_structure(atoms)
    except Exception as exc:  # pymatgen raises many types on odd input
        return _failed(entry_id, UNPARSABLE, f"ASE -> pymatgen: {type(exc).__name__}: {exc}", target)
    return Entry(entry_id, structure, target)


def _info_id(info: dict, id_key: str, fallback: str) -> str:
    value = info.get(id_key)
    return fallback if value is None or str(value) == "" else clean_id(value)


def extxyz_entries(
    path: str | os.PathLike, *, id_key: str, target_key: str, limit: int | None, max_atoms: int, name: str | None = None
) -> Iterator[Entry]:
    """Entries of an extended-XYZ file; frames above ``max_atoms`` are rejected unparsed.
    ``name``: what ids fall back to (default: the file's id)."""
    stem = file_id(path) if name is None else name
    next_index = 0
    try:
        for frame in iter_frames(path, limit=limit, skip_above=max_atoms):
            next_index = frame.index + 1
            fallback = f"{stem}#{frame.index}"
            if frame.natoms == 0:  # nothing to parse
                yield _failed(fallback, EMPTY, "frame declares 0 atoms")
                continue
            if frame.text is None:
                try:
                    info = parse_comment(frame.comment)
                except Exception:  # the id is a courtesy here; the frame is rejected anyway
                    info = {}
                detail = f"frame declares {frame.natoms} atoms > max_atoms={max_atoms} (not parsed)"
                yield _failed(_info_id(info, id_key, fallback), TOO_MANY_ATOMS, detail)
                continue
            try:
                atoms = parse_frame(frame)
            except ValueError as exc:
                yield _failed(fallback, UNPARSABLE, str(exc))
                continue
            yield atoms_entry(atoms, _info_id(atoms.info, id_key, fallback), target_key=target_key, max_atoms=max_atoms)
    except (ValueError, OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # frame boundaries lost / bad gzip
        yield _failed(f"{stem}#{next_index}", UNPARSABLE, f"{exc} (rest of file not read)")


def _is_structure_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and "lattice" in obj and "sites" in obj


def json_entries(
    path: str | os.PathLike, *, id_key: str, target_key: str, limit: int | None, max_atoms: int, name: str | None = None
) -> Iterator[Entry]:
    """Entries of a pymatgen JSON file: a Structure dict, a record ``{"structure", "band_gap",
    "id"}``, or a list of either. Records without an id get ``<name>#<position>``."""
    stem = file_id(path) if name is None else name
    try:
        data = json.loads(read_text(path, max_chars=MAX_JSON_CHARS))
    except (OSError, UnicodeDecodeError, EOFError, ValueError, RecursionError, zlib.error) as exc:  # deep nesting
        yield _failed(stem, UNPARSABLE, f"JSON: {type(exc).__name__}: {exc}")
        return
    single = isinstance(data, dict)
    if not single and not isinstance(data, list):
        yield _failed(stem, UNPARSABLE, f"JSON top level is {type(data).__name__}, expected an object or a list")
        return
    records = [data] if single else data
    for pos, record in enumerate(records[:limit] if limit is not None else records):
        fallback = stem if single else f"{stem}#{pos}"
        if _is_structure_dict(record):
            entry_id, target, sdict = fallback, None, record
        elif isinstance(record, dict) and "structure" in record:
            raw_id = record.get("id", record.get(id_key))
            entry_id = fallback if raw_id is None else clean_id(raw_id)
            target, sdict = record.get(target_key), record["structure"]
        else:
            yield _failed(fallback, UNPARSABLE, "neither a Structure dict nor a {'structure': ...} record")
            continue
        if not isinstance(sdict, dict):
            yield _failed(entry_id, UNPARSABLE, f"'structure' is {type(sdict).__name__}, expected a dict", target)
            continue
        made = structure_from_dict(sdict, max_atoms=max_atoms)
        if isinstance(made, tuple):
            yield _failed(entry_id, *made, target)
        else:
            yield Entry(entry_id, made, target)


def text_structure_entry(path: str | os.PathLike, fmt: str, *, max_atoms: int, name: str | None = None) -> Entry:
    """Entry of a single-structure CIF or POSCAR file (first CIF block), with id ``name`` (default:
    the file's id). The declared size and the work of building it are checked on the text first
    (``precheck``): a file above the bounds is rejected without being built."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifParser

    entry_id = file_id(path) if name is None else name
    with warnings.catch_warnings(record=True) as caught:  # pymatgen warns for every CIF issue
        warnings.simplefilter("default")  # each distinct message once per file (a 1 MB line of tokens: one, not 10^6)
        try:
            text = read_text(path, max_chars=MAX_TEXT_CHARS)
            if fmt == "cif":  # what Structure.from_str(text, fmt="cif") runs, with the check in between
                parser = CifParser.from_str(text)
                problem = cif_problem(parser, max_atoms=max_atoms)
                built = None if problem else parser.parse_structures(primitive=False)[0]
                structure = None if built is None else Structure.from_sites(built, properties=built.properties)
            else:
                problem = poscar_problem(text, max_atoms=max_atoms)
                structure = None if problem else Structure.from_str(text, fmt=fmt)
        except Exception as exc:  # pymatgen's CIF/POSCAR parsers raise many types
            notes = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)))
            detail = f"{fmt}: {type(exc).__name__}: {exc}" + (f" [{notes}]" if notes else "")
            return _failed(entry_id, UNPARSABLE, detail)
    if problem is not None:
        return _failed(entry_id, *problem)
    for message in list(dict.fromkeys(str(w.message) for w in caught))[:MAX_NOTES]:
        log.debug("%s: %s", os.fspath(path), message)
    return Entry(entry_id, structure)


def file_entries(
    path: str | os.PathLike, *, id_key: str, target_key: str, limit: int | None, max_atoms: int, name: str | None = None
) -> Iterator[Entry]:
    """Entries of one file of any supported format. ``name``: the id of a single-structure file,
    and what ids of frames and records without their own fall back to (default: ``file_id``)."""
    fmt = detect_format(path)
    common = dict(id_key=id_key, target_key=target_key, limit=limit, max_atoms=max_atoms, name=name)
    if fmt in ("extxyz", "json"):
        yield from _capped_failures(path, (extxyz_entries if fmt == "extxyz" else json_entries)(path, **common))
    elif fmt in ("cif", "poscar"):
        if limit is None or limit > 0:
            yield text_structure_entry(path, fmt, max_atoms=max_atoms, name=name)
    else:
        yield _failed(clean_id(os.fspath(path)), UNPARSABLE, f"unknown file type; supported formats: {list(FORMATS)}")


def _capped_failures(path: str | os.PathLike, entries: Iterator[Entry]) -> Iterator[Entry]:
    """``entries`` until MAX_FAILED_ENTRIES of them failed to read; then one entry saying so."""
    failed = 0
    for entry in entries:
        failed += entry.failure is not None
        if failed > MAX_FAILED_ENTRIES:
            detail = f"more than {MAX_FAILED_ENTRIES} entries could not be read; the rest of the file is not read"
            yield _failed(f"{clean_id(os.fspath(path))}#rest", UNPARSABLE, detail)
            return
        yield entry


def read_targets_csv(path: str | os.PathLike, *, target_key: str, id_key: str) -> dict[str, str]:
    """``id -> raw band gap`` from a CSV with a header naming ``target_key`` (the id column is
    ``id`` or ``id_key``, else the first column), or a headerless two-column ``id,gap`` file."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{os.fspath(path)}: empty targets CSV")
    header = [cell.strip() for cell in rows[0]]
    if target_key in header:
        id_col = next((header.index(k) for k in ("id", id_key) if k in header), 0)
        target_col, body, first_line = header.index(target_key), rows[1:], 2
    elif len(header) >= 2 and _is_number(header[1]):
        id_col, target_col, body, first_line = 0, 1, rows, 1
    else:
        raise ValueError(
            f"{os.fspath(path)}: no {target_key!r} column (header {header}); "
            f"expected a header like 'id,{target_key}' or headerless 'id,value' rows"
        )
    targets: dict[str, str] = {}
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(id_col, target_col):
            raise ValueError(f"{os.fspath(path)}: line {line} has {len(row)} columns: {row}")
        key = row[id_col].strip()
        if key in targets:
            raise ValueError(f"{os.fspath(path)}: id {key!r} appears twice (line {line})")
        targets[key] = row[target_col].strip()
    return targets


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_target(raw: str | None) -> Any:
    """A CSV cell as a band-gap value: None when empty, float when numeric, else the string."""
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        return raw
