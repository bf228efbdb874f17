"""Remote band-gap sources: the Materials Project (mp-api) and Matbench (matminer).

Both need the optional ``sources`` extra (``pip install matbalora[sources]``); the clients are
imported only when called, and tests pass fakes through ``client_factory`` / ``loader``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from matbalora.atomic import write_json
from matbalora.data.dataset import BandGapDataset
from matbalora.data.entries import Checks, Entry, build_dataset
from matbalora.data.formats import structure_from_dict
from matbalora.data.splits import matbench_fold_ids
from matbalora.data.validation import DEFAULT_MAX_ATOMS, UNPARSABLE, OnInvalid, check_policy

log = logging.getLogger(__name__)

MP_FIELDS: tuple[str, ...] = ("material_id", "structure", "band_gap", "is_metal", "energy_above_hull")
_MP_CACHE_FORMAT = "matbalora.mp_summary/1"
MATBENCH_DATASET = "matbench_mp_gap"
MATBENCH_TARGET = "gap pbe"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/matbalora/materials_project`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "matbalora" / "materials_project"


def _mp_query(
    elements: Sequence[str] | None, num_sites: int | tuple[int, int] | None, energy_above_hull_max: float | None
) -> dict[str, Any]:
    from pymatgen.core import Element

    query: dict[str, Any] = {"elements": None, "num_sites": None, "energy_above_hull": None}
    if elements is not None:
        if isinstance(elements, str):
            raise ValueError(f"elements={elements!r}; pass a list of symbols such as ['Si', 'O']")
        for symbol in elements:
            if not Element.is_valid_symbol(str(symbol)):
                raise ValueError(f"elements contains {symbol!r}, not an element symbol")
        query["elements"] = sorted({str(s) for s in elements})
    if num_sites is not None:
        low, high = (num_sites, num_sites) if isinstance(num_sites, int) else tuple(num_sites)
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
            raise ValueError(f"num_sites={num_sites!r}; need an int or (min, max) with 1 <= min <= max")
        query["num_sites"] = [low, high]
    if energy_above_hull_max is not None:
        if not (isinstance(energy_above_hull_max, int | float) and energy_above_hull_max >= 0):
            raise ValueError(f"energy_above_hull_max={energy_above_hull_max!r}; must be >= 0 eV/atom")
        query["energy_above_hull"] = [0.0, float(energy_above_hull_max)]
    return query


def _mp_rester(api_key: str) -> Any:
    from mp_api.client import MPRester

    return MPRester(api_key)


def _field(doc: Any, name: str) -> Any:
    return doc.get(name) if isinstance(doc, dict) else getattr(doc, name, None)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _mp_record(doc: Any) -> dict[str, Any]:
    structure = _field(doc, "structure")
    if structure is not None and hasattr(structure, "as_dict"):
        structure = structure.as_dict()
    record = {name: _field(doc, name) for name in MP_FIELDS if name != "structure"}
    record["material_id"] = None if record["material_id"] is None else str(record["material_id"])
    record["structure"] = structure
    return record


def _search(client: Any, query: dict[str, Any]) -> list[Any]:
    kwargs: dict[str, Any] = {"fields": list(MP_FIELDS)}
    if query["elements"] is not None:
        kwargs["elements"] = list(query["elements"])
    if query["num_sites"] is not None:
        kwargs["num_sites"] = tuple(query["num_sites"])
    if query["energy_above_hull"] is not None:
        kwargs["energy_above_hull"] = tuple(query["energy_above_hull"])
    if hasattr(client, "__enter__"):
        with client as rester:
            return list(rester.materials.summary.search(**kwargs))
    return list(client.materials.summary.search(**kwargs))


def _read_mp_cache(path: Path, query: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable Materials Project cache %s: %s", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("format") != _MP_CACHE_FORMAT or payload.get("query") != query:
        log.warning("ignoring Materials Project cache %s: different format or query", path)
        return None
    if not isinstance(payload.get("records"), list):
        return None
    return payload


def _mp_entries(records: list[dict[str, Any]], max_atoms: int) -> Iterator[Entry]:
    for pos, record in enumerate(records):
        entry_id = record.get("material_id") or f"materials_project#{pos}"
        gap = record.get("band_gap")
        if gap is None and record.get("is_metal") is True:
            gap = 0.0  # a metal without a stored gap
        sdict = record.get("structure")
        if not isinstance(sdict, dict):
            yield Entry(entry_id, None, gap, (UNPARSABLE, "document has no structure"))
            continue
        made = structure_from_dict(sdict, max_atoms=max_atoms)
        yield Entry(entry_id, None, gap, made) if isinstance(made, tuple) else Entry(entry_id, made, gap)


def from_materials_project(
    *,
    api_key: str | None = None,
    elements: Sequence[str] | None = None,
    num_sites: int | tuple[int, int] | None = None,
    energy_above_hull_max: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    client_factory: Callable[[str], Any] | None = None,
    refresh: bool = False,
    on_invalid: OnInvalid = "skip",
    max_atoms: int = DEFAULT_MAX_ATOMS,
) -> BandGapDataset:
    """Materials Project summary documents (PBE band gaps, eV) as a validated dataset.

    Queries ``MPRester(api_key).materials.summary.search`` (``elements`` all present,
    ``num_sites`` int or (min, max), ``energy_above_hull`` in [0, max] eV/atom) once and keeps the
    documents in ``cache_dir`` (JSON, one file per query); later calls with the same query read
    the cache and make no request (``refresh=True`` forces one). ``api_key`` defaults to
    ``$MP_API_KEY``; it is needed only when a request is made, and never written to the cache.
    ``client_factory(api_key)`` replaces ``MPRester`` (tests).
    """
    check_policy(on_invalid)
    checks = Checks(max_atoms=max_atoms)
    query = _mp_query(elements, num_sites, energy_above_hull_max)
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"summary-{digest}.json"
    payload = None if refresh else _read_mp_cache(cache_path, query)
    if payload is None:
        key = api_key or os.environ.get("MP_API_KEY")
        if not key:
            raise ValueError(
                "no Materials Project API key: pass api_key=... or set MP_API_KEY "
                "(create one at https://next-gen.materialsproject.org/api)"
            )
        docs = _search((client_factory or _mp_rester)(key), query)
        payload = {
            "format": _MP_CACHE_FORMAT,
            "query": query,
            "retrieved": datetime.now(UTC).isoformat(timespec="seconds"),
            "records": [_mp_record(doc) for doc in docs],
        }
        write_json(cache_path, payload, indent=None, default=_jsonable)
        log.info("fetched %d Materials Project documents into %s", len(payload["records"]), cache_path)
    provenance = {
        "source": "materials_project",
        "query": query,
        "retrieved": payload.get("retrieved"),
        "cache": os.fspath(cache_path),
        "n_documents": len(payload["records"]),
    }
    return build_dataset(
        _mp_entries(payload["records"], max_atoms), provenance=provenance, on_invalid=on_invalid, checks=checks
    )


def matbench_id(row: int, n_rows: int) -> str:
    """Matbench's id of row ``row`` (0-based): ``mb-mp-gap-`` + row + 1, zero-padded to
    floor(log10(n_rows)) + 1 digits (6 for the 106,113-row dataset)."""
    width = math.floor(math.log10(n_rows)) + 1
    return f"mb-mp-gap-{row + 1:0{width}d}"


def from_matbench(
    fold: int | None = None,
    *,
    part: Literal["train_val", "test"] = "train_val",
    loader: Callable[[str], Any] | None = None,
    on_invalid: OnInvalid = "skip",
    max_atoms: int = DEFAULT_MAX_ATOMS,
) -> BandGapDataset:
    """Matbench v0.1 ``matbench_mp_gap`` (columns ``structure``, ``gap pbe``) from matminer.

    ``fold=None``: all rows; ``fold=k``: the rows of Matbench's fold ``k`` — its training pool
    (``part='train_val'``) or its test rows (``part='test'``), as Matbench's
    ``get_train_and_val_data`` / ``get_test_data``. Ids are Matbench's ``mb-mp-gap-NNNNNN``
    (see ``splits.matbench_index_from_ids``). ``loader`` replaces
    ``matminer.datasets.load_dataset`` (tests).
    """
    check_policy(on_invalid)
    if part not in ("train_val", "test"):
        raise ValueError(f"part={part!r}; allowed: ['train_val', 'test']")
    if loader is None:
        from matminer.datasets import load_dataset as loader  # type: ignore[no-redef]
    frame = loader(MATBENCH_DATASET)
    missing = [c for c in ("structure", MATBENCH_TARGET) if c not in getattr(frame, "columns", [])]
    if missing:
        raise ValueError(f"{MATBENCH_DATASET} table lacks columns {missing}; has {list(getattr(frame, 'columns', []))}")
    n_rows = len(frame)
    rows = np.arange(n_rows)
    if fold is not None:
        if fold not in range(5):
            raise ValueError(f"fold={fold!r}; Matbench has folds 0..4")
        in_test = matbench_fold_ids(n_rows) == fold
        rows = rows[in_test] if part == "test" else rows[~in_test]
    structures, gaps = frame["structure"].to_numpy(), frame[MATBENCH_TARGET].to_numpy()

    def entries() -> Iterator[Entry]:
        for row in rows:
            entry_id, structure, gap = matbench_id(int(row), n_rows), structures[row], gaps[row]
            if isinstance(structure, dict):
                structure = structure_from_dict(structure, max_atoms=max_atoms)
            if isinstance(structure, tuple):
                yield Entry(entry_id, None, gap, structure)
            elif hasattr(structure, "lattice") and hasattr(structure, "sites"):
                yield Entry(entry_id, structure, gap)
            else:
                yield Entry(entry_id, None, gap, (UNPARSABLE, f"structure is {type(structure).__name__}"))

    provenance = {
        "source": MATBENCH_DATASET,
        "fold": fold,
        "part": part if fold is not None else "all",
        "n_rows": n_rows,
    }
    return build_dataset(entries(), provenance=provenance, on_invalid=on_invalid, checks=Checks(max_atoms=max_atoms))
