"""Frozen-prefix features on disk: fp16 features and int32 indices in safetensors shards, memory-mapped.

The in-memory prefixes of CHGNet (:class:`~matbalora.backbones.chgnet.PrefixGraph`) cost ~450 KB per crystal in
fp32 / int64 at the last block; the ~84,000 training crystals of Materials Project would need
twice the machine's RAM. A :class:`PrefixStore` keeps them on disk instead:

* layout: ``root/manifest.json`` (the key, the backbone family and the ordered ids) and
  ``root/shard_NNNNN.safetensors``, each holding ``shard_size`` consecutive crystals as concatenated
  tensors (CSR: per-crystal row counts of each row kind, e.g. CHGNet's atoms, undirected bonds,
  directed bonds and angles, SevenNet's atoms and edges; index tensors local to their crystal),
  features in fp16, indices in int32, targets in fp32; a family's :class:`Codec` says which tensors;
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from matbalora.atomic import atomic_write, write_json
from matbalora.backbones.base import PrefixBatch

log = logging.getLogger(__name__)

FORMAT = "matbalora-prefix-store/1"
MANIFEST = "manifest.json"
MAX_HEADER_BYTES = 64 << 20  # a safetensors header longer than this is refused (hostile or corrupt file)


@dataclass(frozen=True)
class Field:
    """One stored tensor: its row kind, stored dtype, and for index tensors the row kind each column
    points into (shifted by that kind's batch offsets when crystals are gathered)."""

    kind: str
    dtype: str
    points_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class Codec:
    """How a backbone family's prefixes become stored tensors and back: ``fields`` of each crystal
    (``arrays(prefix)``: name -> tensor [rows, ...] with local indices; ``counts(prefix)``: rows of
    each kind), a batch ``state(tensors, n_crystals)`` for training and a per-crystal
    ``prefix(tensors, block, graph_id)`` for prediction."""

    family: str
    kinds: tuple[str, ...]
    fields: dict[str, Field]
    counts: Callable[[object], dict[str, int]]
    arrays: Callable[[object], dict[str, torch.Tensor | None]]
    state: Callable[[dict[str, torch.Tensor], int], object]
    prefix: Callable[[dict[str, torch.Tensor], int, str], object]


def _owners(n_atom: np.ndarray) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(n_atom)), torch.from_numpy(np.asarray(n_atom, dtype=np.int64)))


def _chgnet_state(t: dict[str, torch.Tensor], n: int):
    from matbalora.backbones.chgnet import State

    angles = "bond_graph" in t and t["bond_graph"].shape[0] > 0
    return State(
        atom=t["atom"], bond=t["bond"], angle=t["angle"] if angles else None, bond_w_ag=t["bond_w_ag"],
        bond_w_bg=t["bond_w_bg"] if "bond_w_bg" in t else torch.zeros(0),
        atom_graph=t["atom_graph"].reshape(-1, 2), bond_graph=t["bond_graph"] if angles else torch.zeros(0, 3, dtype=torch.long),
        d2u=t["d2u"], atom_owners=_owners(t["n_atom"].numpy()), n_groups=n,
    )


def _chgnet_prefix(t: dict[str, torch.Tensor], block: int, sid: str):
    from matbalora.backbones.chgnet import PrefixGraph

    item = PrefixGraph(block=block, atom=t["atom"], bond=t["bond"], bond_w_ag=t["bond_w_ag"], atom_graph=t["atom_graph"].reshape(-1, 2), d2u=t["d2u"], graph_id=sid)
    if "bond_graph" in t:
        item.angle, item.bond_w_bg, item.bond_graph = t["angle"], t["bond_w_bg"], t["bond_graph"]
    return item


#: PrefixGraph attribute -> how it is stored
_CHGNET_FIELDS = {
    "atom": Field("atom", "float16"),
    "bond": Field("und", "float16"),
    "bond_w_ag": Field("und", "float16"),
    "bond_w_bg": Field("und", "float16"),
    "angle": Field("angle", "float16"),
    "atom_graph": Field("dir", "int32", ("atom", "atom")),
    "d2u": Field("dir", "int32", ("und",)),
    "bond_graph": Field("angle", "int32", ("atom", "und", "und")),
}
CHGNET_CODEC = Codec(
    family="chgnet",
    kinds=("atom", "und", "dir", "angle"),
    fields=_CHGNET_FIELDS,
    counts=lambda p: {"atom": p.atom.shape[0], "und": p.bond.shape[0], "dir": p.atom_graph.shape[0],
                      "angle": 0 if p.bond_graph is None else p.bond_graph.shape[0]},
    arrays=lambda p: {name: getattr(p, name) for name in _CHGNET_FIELDS},
    state=_chgnet_state,
    prefix=_chgnet_prefix,
)


def _sevennet_data(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    data = {k: t[k] for k in ("x", "node_attr", "edge_embedding", "edge_attr") if k in t}
    data["edge_index"] = t["edge_index"].reshape(-1, 2).T.contiguous()
    return data


def _sevennet_state(t: dict[str, torch.Tensor], n: int):
    from matbalora.backbones.sevennet import State

    return State(_sevennet_data(t), _owners(t["n_atom"].numpy()), n)


def _sevennet_prefix(t: dict[str, torch.Tensor], block: int, sid: str):
    from matbalora.backbones.sevennet import SevenNetPrefix

    return SevenNetPrefix(block, _sevennet_data(t), sid)


SEVENNET_CODEC = Codec(
    family="sevennet",
    kinds=("atom", "edge"),
    fields={
        "x": Field("atom", "float16"),
        "node_attr": Field("atom", "float16"),
        "edge_embedding": Field("edge", "float16"),
        "edge_attr": Field("edge", "float16"),
        "edge_index": Field("edge", "int32", ("atom", "atom")),  # stored [n_edges, 2]
    },
    counts=lambda p: {"atom": p.data["x"].shape[0], "edge": p.data["edge_index"].shape[1]},
    arrays=lambda p: {**{k: p.data.get(k) for k in ("x", "node_attr", "edge_embedding", "edge_attr")}, "edge_index": p.data["edge_index"].T},
    state=_sevennet_state,
    prefix=_sevennet_prefix,
)
CODECS = {c.family: c for c in (CHGNET_CODEC, SEVENNET_CODEC)}


def codec_for(family: str) -> Codec:
    if family not in CODECS:
        raise ValueError(f"no prefix-store codec for backbone family {family!r} (known: {sorted(CODECS)})")
    return CODECS[family]


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
        if arr.size:  # (an empty tensor has no bytes, and memoryview refuses to cast it)
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

    def __init__(self, path: Path, *, verify: bool = True, codec: Codec = CHGNET_CODEC) -> None:
        self.path = path
        self.codec = codec
        self.arrays, meta = read_safetensors_mmap(path)
        self.meta = meta
        if verify and _checksum(self.arrays) != meta.get("sha256"):
            raise CorruptShardError(f"{path}: checksum mismatch (truncated or altered); delete it and rebuild")
        self.ids: list[str] = json.loads(meta.get("ids", "[]"))
        self.block = int(meta.get("block", -1))
        family = meta.get("family", "chgnet")  # stores written before SevenNet had no family: CHGNet
        if family != codec.family:
            raise CorruptShardError(f"{path}: holds {family} prefixes, the store says {codec.family}")
        missing = [k for k in codec.kinds if f"n_{k}" not in self.arrays]
        if missing:
            raise CorruptShardError(f"{path}: no row counts for {missing}")
        self.counts = {k: np.asarray(self.arrays[f"n_{k}"], dtype=np.int64) for k in codec.kinds}
        if any(len(c) != len(self.ids) for c in self.counts.values()):
            raise CorruptShardError(f"{path}: row counts do not match its {len(self.ids)} ids")
        self.offsets = {k: _exclusive_cumsum(c) for k, c in self.counts.items()}
        for name, f in codec.fields.items():
            if name in self.arrays and self.arrays[name].shape[0] != int(self.counts[f.kind].sum()):
                raise CorruptShardError(f"{path}: {name} has {self.arrays[name].shape[0]} rows, the counts say {int(self.counts[f.kind].sum())}")
        self.targets = np.asarray(self.arrays["target"], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, sel: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of crystals ``sel`` (positions in this shard), features in fp32, indices shifted to the batch."""
        sel = np.asarray(sel, dtype=np.int64)
        kinds = self.codec.kinds
        counts = {k: self.counts[k][sel] for k in kinds}
        rows = {k: _ranges(self.offsets[k][sel], counts[k]) for k in kinds}
        new_off = {k: _exclusive_cumsum(counts[k]) for k in kinds}
        out: dict[str, np.ndarray] = {f"n_{k}": counts[k] for k in kinds}
        for name, f in self.codec.fields.items():
            if name not in self.arrays:
                continue
            part = self.arrays[name][rows[f.kind]]
            if f.dtype == "float16":
                out[name] = part.astype(np.float32)
                continue
            part = part.astype(np.int64)
            if f.points_to:  # local indices -> batch indices: + the offset of each crystal in the kind pointed into
                shift = np.stack([np.repeat(new_off[k], counts[f.kind]) for k in f.points_to], axis=1)
                part += shift[:, 0] if part.ndim == 1 else shift
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
        self.codec = codec_for(self.manifest.get("family", "chgnet"))
        missing = [k for k in range(self.n_shards) if not self.shard_path(k).is_file()]
        if missing and not allow_missing:
            raise FileNotFoundError(f"{self.root}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} missing; resume the build")
        self.shards = {k: Shard(self.shard_path(k), verify=verify, codec=self.codec) for k in range(self.n_shards) if k not in missing}
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

    def n_atoms(self, ids: Sequence[str]) -> list[int]:
        return [int(self.shards[k].counts["atom"][j]) for k, j in self.locate(ids)]

    def batch(self, shard: int, sel: np.ndarray) -> PrefixBatch:
        """Collated prefixes of crystals ``sel`` of one shard (vectorised gather)."""
        g = self.shards[shard].gather(sel)
        t = {k: torch.from_numpy(v) for k, v in g.items()}
        return PrefixBatch(self.block, self.codec.state(t, len(sel)), len(sel))

    def prefix_graphs(self, ids: Sequence[str]) -> list:
        """The family's in-memory prefixes (fp32) of ``ids``: for validation and test sets that the
        prediction code handles as lists."""
        out = []
        for (k, j), sid in zip(self.locate(ids), ids):
            g = self.shards[k].gather(np.array([j]))
            out.append(self.codec.prefix({name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in g.items()}, self.block, sid))
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

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of which crystals this source holds: the store's root and their positions."""
        h = hashlib.sha256(str(self.store.root).encode())
        for shard, positions in self.by_shard.items():
            h.update(f"{shard}:".encode() + np.asarray(positions, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

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


def _shard_arrays(prefixes: Sequence, targets: Sequence[float], ids: Sequence[str], block: int, rejected: dict[str, str],
                  codec: Codec = CHGNET_CODEC) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    counts = {k: [] for k in codec.kinds}
    per_crystal = [codec.arrays(p) for p in prefixes]
    for p in prefixes:
        for k, c in codec.counts(p).items():
            counts[k].append(int(c))
    for name, f in codec.fields.items():
        parts = [a[name] for a in per_crystal]
        dtype = f.dtype
        if not parts or any(x is None for x in parts):
            continue
        arr = torch.cat([x.flatten(1) if x.dim() > 1 else x for x in parts]).numpy()  # [rows, ...] -> [rows, d], 0 rows too
        if dtype == "float16" and np.abs(arr).max(initial=0.0) > 6e4:
            raise ValueError(f"{name}: values up to {np.abs(arr).max():.3g} overflow float16")
        arrays[name] = np.ascontiguousarray(arr.astype(dtype))
    for k in codec.kinds:
        arrays[f"n_{k}"] = np.array(counts[k], dtype=np.int32)
    arrays["target"] = np.array(targets, dtype=np.float32)
    meta = {"format": FORMAT, "family": codec.family, "block": str(block), "ids": json.dumps(list(ids)), "rejected": json.dumps(rejected)}
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
    family: str = "chgnet",
    upto: int | None = None,
) -> Path:
    """Build (or resume) the store of crystals ``ids`` at ``root``.

    ``load_shard(positions)`` -> (prefixes, targets, kept ids, {rejected id: reason}) for the
    crystals at those positions of ``ids`` (graph conversion and the frozen blocks happen there).
    This process builds the missing or corrupt shards k with ``k % workers == worker``; the manifest
    is written first, so concurrent workers agree on the layout. ``family``: the backbone family of the
    prefixes (its :class:`Codec`). ``upto``: build only the shards holding the first ``upto`` crystals
    (a later call without it completes the store). Returns ``root``.
    """
    from tqdm.auto import tqdm

    if not 0 <= worker < workers:
        raise ValueError(f"worker={worker} must be in 0..{workers - 1}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    codec = codec_for(family)
    manifest = {"format": FORMAT, "key": key, "family": family, "block": int(block), "shard_size": int(shard_size), "ids": list(ids), "info": info or {}}
    path = root / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") != key:
            raise ValueError(f"{root} holds a store with another key ({old.get('key', '?')[:12]}...); use another folder")
        if old.get("family", "chgnet") != family:  # (its shards would all look corrupt and be overwritten)
            raise ValueError(f"{root} holds {old.get('family', 'chgnet')} prefixes, not {family}; use another folder")
    else:
        write_json(path, manifest)
    n_shards = -(-min(len(ids), len(ids) if upto is None else upto) // shard_size)
    mine = [k for k in range(n_shards) if k % workers == worker]
    for k in tqdm(mine, desc=f"prefix shards (worker {worker}/{workers})", disable=not progress):
        shard = root / f"shard_{k:05d}.safetensors"
        if shard.is_file():
            try:
                Shard(shard, verify=True, codec=codec)
                continue
            except CorruptShardError as exc:
                log.warning("%s; rebuilding", exc)
        positions = list(range(k * shard_size, min(len(ids), (k + 1) * shard_size)))
        prefixes, targets, kept, rejected = load_shard(positions)
        arrays, meta = _shard_arrays(prefixes, targets, kept, block, rejected, codec)
        atomic_write(shard, lambda tmp: save_file(arrays, tmp, metadata=meta))
    return root
