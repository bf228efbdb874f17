"""Convert structures to CHGNet CrystalGraphs once, and keep them on disk (or in memory).

Layout: ``root/<key[:2]>/<key>.safetensors``, one verified file per graph (see ``graph_io``),
keyed by the SHA-256 of the exact structure, the backbone version, the converter's cutoffs and
algorithm. Files are written to a temporary name and renamed (``os.replace``), so readers never
see half a file; an entry that fails verification (truncated, altered, wrong shapes) is logged,
rebuilt and overwritten, never used. ``workers > 1`` converts in a spawn-context process pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matbalora.atomic import write_bytes
from matbalora.data.graph_io import CorruptGraphError, graph_from_bytes, graph_to_bytes, relabel, structure_key

if TYPE_CHECKING:
    from chgnet.graph import CrystalGraph
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

_WORKER: dict[str, Any] = {}  # set only inside pool worker processes, by _init_worker


@dataclass
class CacheStats:
    """Counters since the cache was created: graphs read from the cache, converted, and
    converted again because the stored entry failed verification."""

    hits: int = 0
    built: int = 0
    rebuilt: int = 0


def _convert(
    converter: Callable, backbone_version: str, job: tuple[int, Structure, str]
) -> tuple[int, bytes | None, str]:
    pos, structure, key = job
    try:
        graph = converter(structure)
        return pos, graph_to_bytes(graph, key=key, backbone_version=backbone_version), ""
    except Exception as exc:  # reported with the entry id by the caller
        return pos, None, f"{type(exc).__name__}: {exc}"


def _init_worker(converter: Callable, backbone_version: str) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER["converter"], _WORKER["backbone_version"] = converter, backbone_version


def _convert_in_worker(job: tuple[int, Structure, str]) -> tuple[int, bytes | None, str]:
    return _convert(_WORKER["converter"], _WORKER["backbone_version"], job)


class GraphCache:
    """CrystalGraphs for structures, converted once with ``converter`` (CHGNet's
    ``model.graph_converter``) and cached under ``root`` (None: in memory for this object)."""

    def __init__(self, root: str | os.PathLike | None, *, converter: Callable, backbone_version: str) -> None:
        missing = [a for a in ("atom_graph_cutoff", "bond_graph_cutoff") if not hasattr(converter, a)]
        if missing:
            raise ValueError(f"converter {converter!r} lacks {missing}; pass a chgnet CrystalGraphConverter")
        if not backbone_version:
            raise ValueError(f"backbone_version={backbone_version!r}; must be a non-empty string")
        self.root = None if root is None else Path(root)
        self.converter = converter
        self.backbone_version = str(backbone_version)
        self.stats = CacheStats()
        self._memory: dict[str, bytes] = {}

    def __repr__(self) -> str:
        where = "memory" if self.root is None else os.fspath(self.root)
        return f"GraphCache({where!r}, backbone_version={self.backbone_version!r}, stats={self.stats})"

    def key(self, structure: Structure) -> str:
        return structure_key(
            structure,
            backbone_version=self.backbone_version,
            atom_graph_cutoff=self.converter.atom_graph_cutoff,
            bond_graph_cutoff=self.converter.bond_graph_cutoff,
            algorithm=str(getattr(self.converter, "algorithm", "")),
        )

    def path(self, key: str) -> Path | None:
        """Where the graph of ``key`` lives on disk (None in memory mode)."""
        return None if self.root is None else self.root / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, graph_id: str | None) -> CrystalGraph | None:
        path = self.path(key)
        if path is None:
            data = self._memory.get(key)
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = None
        if data is None:
            return None
        try:
            return graph_from_bytes(data, key=key, backbone_version=self.backbone_version, graph_id=graph_id)
        except CorruptGraphError as exc:
            log.warning("graph cache entry %s failed verification (%s); rebuilding it", path or key, exc)
            self.stats.rebuilt += 1
            return None

    def _write(self, key: str, data: bytes) -> None:
        path = self.path(key)
        if path is None:
            self._memory[key] = data
            return
        write_bytes(path, data, durable=False)  # a lost entry is rebuilt; an fsync per graph is not worth it

    def _run(
        self, jobs: list[tuple[int, Structure, str]], workers: int, progress: bool
    ) -> Iterator[tuple[int, bytes | None, str]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="crystal graphs", unit="graph", disable=not progress)
        try:
            if workers == 1 or len(jobs) < 2:
                for job in jobs:
                    yield _convert(self.converter, self.backbone_version, job)
                    bar.update()
                return
            try:
                pickle.dumps(self.converter)
            except Exception as exc:
                raise ValueError(f"workers={workers} needs a picklable converter: {exc}") from exc
            ctx = multiprocessing.get_context("spawn")
            chunk = max(1, min(64, len(jobs) // (workers * 8)))
            with ctx.Pool(min(workers, len(jobs)), _init_worker, (self.converter, self.backbone_version)) as pool:
                for result in pool.imap_unordered(_convert_in_worker, jobs, chunksize=chunk):
                    yield result
                    bar.update()
        finally:
            bar.close()

    def graphs(
        self,
        structures: Sequence[Structure],
        *,
        ids: Sequence[str] | None = None,
        workers: int = 1,
        progress: bool = True,
    ) -> list[CrystalGraph]:
        """One CrystalGraph per structure, in order (``graph_id`` = ``ids[i]``); structures not in
        the cache are converted (identical structures once) and stored. Raises ValueError naming
        the entry when the converter fails (e.g. isolated atoms: validate structures first)."""
        if ids is not None and len(ids) != len(structures):
            raise ValueError(f"{len(ids)} ids for {len(structures)} structures")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r}; must be a positive integer")
        names = list(ids) if ids is not None else [None] * len(structures)
        keys = [self.key(s) for s in structures]
        out: list[CrystalGraph | None] = [None] * len(structures)
        first: dict[str, int] = {}
        jobs = []
        for pos, key in enumerate(keys):
            if key in first:
                continue
            first[key] = pos
            out[pos] = self._read(key, names[pos])
            if out[pos] is None:
                jobs.append((pos, structures[pos], key))
            else:
                self.stats.hits += 1
        for pos, data, error in self._run(jobs, workers, progress):
            if data is None:
                raise ValueError(f"graph conversion failed for entry {names[pos] or pos}: {error}")
            self._write(keys[pos], data)
            out[pos] = graph_from_bytes(
                data, key=keys[pos], backbone_version=self.backbone_version, graph_id=names[pos]
            )
            self.stats.built += 1
        for pos, key in enumerate(keys):
            if out[pos] is None:
                out[pos] = relabel(out[first[key]], names[pos])
        return out  # type: ignore[return-value]
