"""CHGNet's frozen-prefix features on disk: fp16 features and int32 indices in safetensors shards, memory-mapped.

The in-memory prefixes of CHGNet (:class:`~matbalora.backbones.chgnet.PrefixGraph`) cost ~450 KB per crystal in
fp32 / int64 at the last block; the ~84,000 training crystals of Materials Project would need
twice the machine's RAM. A :class:`PrefixStore` keeps them on disk instead:

* layout: ``root/manifest.json`` (the key and the ordered ids) and ``root/shard_NNNNN.safetensors``,
  each holding ``shard_size`` consecutive crystals as concatenated tensors (CSR: per-crystal row
  counts for atoms, undirected bonds, directed bonds and angles; index tensors local to their
  crystal), features in fp16, indices in int32, targets in fp32;
* reading maps every tensor with ``numpy.memmap`` (the safetensors header gives its offsets), so
  several training processes share one copy through the page cache, and a process holds only the
  batches it gathers;
* every shard records a SHA-256 of its tensors, checked when the store is opened; a shard that fails
  the check (truncated, altered) is reported and rebuilt by the next build, never used;
* building is resumable and can be split over processes (``worker``/``workers``: shard k is built by
  worker ``k % workers``); a killed build continues at the first missing shard. Files are written
  under a temporary name and renamed, so readers never see half a shard.

Batches are gathered without per-crystal Python work (:meth:`PrefixStore.batch`): the rows of the
chosen crystals are concatenated ranges, computed with ``numpy.repeat``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from matbalora.atomic import atomic_write, write_json
from matbalora.backbones.base import PrefixBatch
from matbalora.backbones.chgnet import PrefixGraph, State

log = logging.getLogger(__name__)

FORMAT = "matbalora-prefix-store/1"
MANIFEST = "manifest.json"
MAX_HEADER_BYTES = 64 << 20  # a safetensors header longer than this is refused (hostile or corrupt file)
#: PrefixGraph field -> (row kind, stored dtype); index fields are local to their crystal
FIELDS: dict[str, tuple[str, str]] = {
    "atom": ("atom", "float16"),
    "bond": ("und", "float16"),
    "bond_w_ag": ("und", "float16"),
    "bond_w_bg": ("und", "float16"),
    "angle": ("angle", "float16"),
    "atom_graph": ("dir", "int32"),
    "d2u": ("dir", "int32"),
    "bond_graph": ("angle", "int32"),
}
KINDS = ("atom", "und", "dir", "angle")
_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "I8": np.int8, "U8": np.uint8}


class CorruptShardError(ValueError):
    """A shard whose header, shapes or checksum do not match what was written."""


def store_key(*, backbone_version: str, block: int, data_fingerprint: str, ids: Sequence[str], shard_size: int, extra: dict | None = None) -> str:
    """SHA-256 of everything that determines the store's content."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "backbone_version": backbone_version, "block": int(block),
                                        "data": data_fingerprint, "shard_size": int(shard_size), "extra": extra or {}}, sort_keys=True).encode())
    digest.update("\n".join(ids).encode())
    return digest.hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{arr.dtype.str}:{list(arr.shape)}".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def read_safetensors_mmap(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors of a safetensors file as read-only ``numpy.memmap`` views, and its metadata.
    Parses the header itself (8-byte length, JSON) and refuses oversized or inconsistent headers."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CorruptShardError(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptShardError(f"{path}: safetensors header of {n} bytes is larger than the file or the {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise CorruptShardError(f"{path}: unreadable safetensors header ({exc})") from None
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CorruptShardError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of {sorted(_DTYPES)}")
        shape = tuple(int(s) for s in info["shape"])
        start, end = (int(v) for v in info["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or base + end > size:
            raise CorruptShardError(f"{path}: tensor {name!r} offsets {start}..{end} do not fit its shape {shape} or the file")
        out[name] = np.zeros(shape, dtype) if end == start else np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return out, meta


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c), without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    excl = np.cumsum(counts) - counts
    return np.repeat(starts - excl, counts) + np.arange(total, dtype=np.int64)


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)


class Shard:
    """One memory-mapped shard: tensors, per-crystal counts and offsets."""

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = path
        self.arrays, meta = read_safetensors_mmap(path)
        self.meta = meta
        if verify and _checksum(self.arrays) != meta.get("sha256"):
            raise CorruptShardError(f"{path}: checksum mismatch (truncated or altered); delete it and rebuild")
        self.ids: list[str] = json.loads(meta.get("ids", "[]"))
        self.block = int(meta.get("block", -1))
        self.counts = {k: np.asarray(self.arrays[f"n_{k}"], dtype=np.int64) for k in KINDS}
        if any(len(c) != len(self.ids) for c in self.counts.values()):
            raise CorruptShardError(f"{path}: row counts do not match its {len(self.ids)} ids")
        self.offsets = {k: _exclusive_cumsum(c) for k, c in self.counts.items()}
        for name, (kind, _) in FIELDS.items():
            if name in self.arrays and self.arrays[name].shape[0] != int(self.counts[kind].sum()):
                raise CorruptShardError(f"{path}: {name} has {self.arrays[name].shape[0]} rows, the counts say {int(self.counts[kind].sum())}")
        self.targets = np.asarray(self.arrays["target"], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, sel: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of crystals ``sel`` (positions in this shard), features in fp32, indices shifted to the batch."""
        sel = np.asarray(sel, dtype=np.int64)
        counts = {k: self.counts[k][sel] for k in KINDS}
        rows = {k: _ranges(self.offsets[k][sel], counts[k]) for k in KINDS}
        new_off = {k: _exclusive_cumsum(counts[k]) for k in KINDS}
        out: dict[str, np.ndarray] = {f"n_{k}": counts[k] for k in KINDS}
        for name, (kind, dtype) in FIELDS.items():
            if name not in self.arrays:
                continue
            part = self.arrays[name][rows[kind]]
            if dtype == "float16":
                out[name] = part.astype(np.float32)
                continue
            part = part.astype(np.int64)
            if name == "atom_graph":
                part += np.repeat(new_off["atom"], counts["dir"])[:, None]
            elif name == "d2u":
                part += np.repeat(new_off["und"], counts["dir"])
            elif name == "bond_graph":
                part += np.stack([np.repeat(new_off["atom"], counts["angle"]), *[np.repeat(new_off["und"], counts["angle"])] * 2], axis=1)
            out[name] = part
        return out


class PrefixStore:
    """A finished store: shards opened (and verified) once, crystals addressed by global position."""

    def __init__(self, root: str | os.PathLike, *, verify: bool = True, allow_missing: bool = False) -> None:
        """``allow_missing``: open the shards built so far (a build still running elsewhere); the
        crystals of missing shards are then not in ``kept``."""
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.root}: no {MANIFEST}; build the store first (build_prefix_store)")
        self.manifest = json.loads(manifest.read_text())
        self.ids: list[str] = list(self.manifest["ids"])
        self.shard_size = int(self.manifest["shard_size"])
        self.block = int(self.manifest["block"])
        missing = [k for k in range(self.n_shards) if not self.shard_path(k).is_file()]
        if missing and not allow_missing:
            raise FileNotFoundError(f"{self.root}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} missing; resume the build")
        self.shards = {k: Shard(self.shard_path(k), verify=verify) for k in range(self.n_shards) if k not in missing}
        #: (shard, position) of every stored crystal; rejected ones (and those of missing shards) are absent
        self.kept = {sid: (k, j) for k, sh in self.shards.items() for j, sid in enumerate(sh.ids)}

    @property
    def n_shards(self) -> int:
        return -(-len(self.ids) // self.shard_size)

    def shard_path(self, k: int) -> Path:
        return self.root / f"shard_{k:05d}.safetensors"

    def locate_position(self, sid: str) -> int:
        """The shard that holds (or would hold) crystal ``sid`` of the manifest."""
        if not hasattr(self, "_position"):
            self._position = {i: p for p, i in enumerate(self.ids)}
        return self._position[sid] // self.shard_size

    def rejected(self) -> dict[str, str]:
        """Ids that were not stored -> reason."""
        out: dict[str, str] = {}
        for sh in self.shards.values():
            out.update(json.loads(sh.meta.get("rejected", "{}")))
        return out

    def nbytes(self) -> int:
        return sum(sh.path.stat().st_size for sh in self.shards.values())

    def locate(self, ids: Sequence[str]) -> list[tuple[int, int]]:
        """(shard, position) of each id; KeyError names the first id not stored."""
        try:
            return [self.kept[i] for i in ids]
        except KeyError as exc:
            raise KeyError(f"{exc.args[0]!r} is not in the store {self.root} (rejected at build, or another selection)") from None

    def targets(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([self.shards[k].targets[j] for k, j in self.locate(ids)])

    def batch(self, shard: int, sel: np.ndarray) -> PrefixBatch:
        """Collated prefixes of crystals ``sel`` of one shard (vectorised gather)."""
        g = self.shards[shard].gather(sel)
        n = len(sel)
        angles = "bond_graph" in g and g["bond_graph"].shape[0] > 0
        t = {k: torch.from_numpy(v) for k, v in g.items()}
        state = State(
            atom=t["atom"], bond=t["bond"], angle=t["angle"] if angles else None, bond_w_ag=t["bond_w_ag"],
            bond_w_bg=t["bond_w_bg"] if "bond_w_bg" in t else torch.zeros(0),
            atom_graph=t["atom_graph"].reshape(-1, 2), bond_graph=t["bond_graph"] if angles else torch.zeros(0, 3, dtype=torch.long),
            d2u=t["d2u"], atom_owners=torch.repeat_interleave(torch.arange(n), torch.from_numpy(g["n_atom"])), n_groups=n,
        )
        return PrefixBatch(self.block, state, n)

    def prefix_graphs(self, ids: Sequence[str]) -> list:
        """In-memory PrefixGraph objects (fp32) of ``ids``: for validation and test sets that the
        prediction code handles as lists."""
        out = []
        for (k, j), sid in zip(self.locate(ids), ids):
            g = self.shards[k].gather(np.array([j]))
            t = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in g.items()}
            item = PrefixGraph(block=self.block, atom=t["atom"], bond=t["bond"], bond_w_ag=t["bond_w_ag"],
                               atom_graph=t["atom_graph"].reshape(-1, 2), d2u=t["d2u"], graph_id=sid)
            if "bond_graph" in t:
                item.angle, item.bond_w_bg, item.bond_graph = t["angle"], t["bond_w_bg"], t["bond_graph"]
            out.append(item)
        return out


class StoreBatches:
    """Training batches from a store: each epoch visits the shards in a seeded random order and the
    chosen crystals of each shard in a seeded random order (shuffling within shards keeps every read
    local to one file)."""

    def __init__(self, store: PrefixStore, ids: Sequence[str]) -> None:
        self.store = store
        by_shard: dict[int, list[int]] = {}
        for k, j in store.locate(ids):
            by_shard.setdefault(k, []).append(j)
        self.by_shard = {k: np.array(sorted(v), dtype=np.int64) for k, v in sorted(by_shard.items())}
        self.n = sum(len(v) for v in self.by_shard.values())

    def __len__(self) -> int:
        return self.n

    def n_batches(self, batch_size: int) -> int:
        return sum(-(-len(v) // batch_size) for v in self.by_shard.values())

    def epoch(self, batch_size: int, generator: torch.Generator, skip: int = 0) -> Iterator[tuple[PrefixBatch, torch.Tensor]]:
        """(collated batch, targets [n] eV) per batch; the first ``skip`` batches are planned but not read."""
        shards = list(self.by_shard)
        plan = []
        for s in torch.randperm(len(shards), generator=generator).tolist():
            k = shards[s]
            local = self.by_shard[k][torch.randperm(len(self.by_shard[k]), generator=generator).numpy()]
            plan.extend((k, np.sort(local[i : i + batch_size])) for i in range(0, len(local), batch_size))  # sorted: sequential reads
        for k, sel in plan[skip:]:
            yield self.store.batch(k, sel), torch.as_tensor(self.store.shards[k].targets[sel], dtype=torch.float32)


def _shard_arrays(prefixes: Sequence, targets: Sequence[float], ids: Sequence[str], block: int, rejected: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    counts = {k: [] for k in KINDS}
    for p in prefixes:
        counts["atom"].append(p.atom.shape[0])
        counts["und"].append(p.bond.shape[0])
        counts["dir"].append(p.atom_graph.shape[0])
        counts["angle"].append(0 if p.bond_graph is None else p.bond_graph.shape[0])
    for name, (_, dtype) in FIELDS.items():
        parts = [getattr(p, name) for p in prefixes]
        if not parts or any(x is None for x in parts):
            continue
        arr = torch.cat([x.reshape(x.shape[0], -1) if x.dim() > 1 else x for x in parts]).numpy()
        if dtype == "float16" and np.abs(arr).max(initial=0.0) > 6e4:
            raise ValueError(f"{name}: values up to {np.abs(arr).max():.3g} overflow float16")
        arrays[name] = np.ascontiguousarray(arr.astype(dtype))
    for k in KINDS:
        arrays[f"n_{k}"] = np.array(counts[k], dtype=np.int32)
    arrays["target"] = np.array(targets, dtype=np.float32)
    meta = {"format": FORMAT, "block": str(block), "ids": json.dumps(list(ids)), "rejected": json.dumps(rejected)}
    meta["sha256"] = _checksum(arrays)
    return arrays, meta


def build_prefix_store(
    root: str | os.PathLike,
    *,
    ids: Sequence[str],
    load_shard: Callable[[Sequence[int]], tuple[list, list[float], list[str], dict[str, str]]],
    key: str,
    block: int,
    shard_size: int = 512,
    worker: int = 0,
    workers: int = 1,
    progress: bool = True,
    info: dict | None = None,
) -> Path:
    """Build (or resume) the store of crystals ``ids`` at ``root``.

    ``load_shard(positions)`` -> (prefixes, targets, kept ids, {rejected id: reason}) for the
    crystals at those positions of ``ids`` (graph conversion and the frozen blocks happen there).
    This process builds the missing or corrupt shards k with ``k % workers == worker``; the manifest
    is written first, so concurrent workers agree on the layout. Returns ``root``.
    """
    from tqdm.auto import tqdm

    if not 0 <= worker < workers:
        raise ValueError(f"worker={worker} must be in 0..{workers - 1}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "key": key, "block": int(block), "shard_size": int(shard_size), "ids": list(ids), "info": info or {}}
    path = root / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") != key:
            raise ValueError(f"{root} holds a store with another key ({old.get('key', '?')[:12]}...); use another folder")
    else:
        write_json(path, manifest)
    n_shards = -(-len(ids) // shard_size)
    mine = [k for k in range(n_shards) if k % workers == worker]
    for k in tqdm(mine, desc=f"prefix shards (worker {worker}/{workers})", disable=not progress):
        shard = root / f"shard_{k:05d}.safetensors"
        if shard.is_file():
            try:
                Shard(shard, verify=True)
                continue
            except CorruptShardError as exc:
                log.warning("%s; rebuilding", exc)
        positions = list(range(k * shard_size, min(len(ids), (k + 1) * shard_size)))
        prefixes, targets, kept, rejected = load_shard(positions)
        arrays, meta = _shard_arrays(prefixes, targets, kept, block, rejected)
        atomic_write(shard, lambda tmp: save_file(arrays, tmp, metadata=meta))
    return root
