"""CHGNet CrystalGraph <-> safetensors bytes, with a checksum and structural checks on read.

A graph is stored as its tensors plus header metadata: format, cache key, backbone version,
cutoffs, composition, each tensor's original dtype, which tensors require grad, and a SHA-256 over
names, dtypes, shapes and bytes of the original tensors. Integer-valued tensors are stored in
the narrowest integer type that holds them exactly (int8/int16; periodic images are small
integers kept as float32 by CHGNet), which halves the files; reading restores the original
dtypes and the checksum proves the round trip exact. ``graph_from_bytes`` refuses anything that
does not verify.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from chgnet.graph import CrystalGraph
    from pymatgen.core import Structure

FORMAT = "matbalora.graph/1"
TENSOR_FIELDS = (
    "atomic_number",
    "atom_frac_coord",
    "atom_graph",
    "neighbor_image",
    "directed2undirected",
    "undirected2directed",
    "bond_graph",
    "lattice",
)
_INDEX_FIELDS = ("atomic_number", "atom_graph", "directed2undirected", "undirected2directed", "bond_graph")


class CorruptGraphError(ValueError):
    """A stored graph that failed verification (truncated, altered, or inconsistent)."""


def structure_key(
    structure: Structure,
    *,
    backbone_version: str,
    atom_graph_cutoff: float,
    bond_graph_cutoff: float,
    algorithm: str = "",
) -> str:
    """SHA-256 hex of the exact lattice, fractional coordinates and species (float64 bytes),
    plus everything else that changes the graph: backbone version, cutoffs, converter algorithm."""
    header = {
        "format": FORMAT,
        "backbone_version": str(backbone_version),
        "atom_graph_cutoff": float(atom_graph_cutoff),
        "bond_graph_cutoff": float(bond_graph_cutoff),
        "algorithm": str(algorithm),
        "n_sites": len(structure),
        "pbc": [bool(p) for p in structure.lattice.pbc],
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(structure.lattice.matrix, dtype="<f8").tobytes())
    digest.update(np.ascontiguousarray(structure.frac_coords, dtype="<f8").tobytes())
    digest.update("\n".join(site.species_string for site in structure).encode())
    return digest.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """``t`` in int8/int16 when that holds every value exactly, else ``t`` itself."""
    import torch

    a = t.numpy()
    if a.size == 0 or a.dtype.itemsize == 1 or a.dtype.kind not in "iuf":
        return t
    if a.dtype.kind == "f" and not np.array_equal(a, np.rint(a)):  # NaN also keeps the float
        return t
    low, high = a.min(), a.max()
    for small in (np.int8, np.int16):
        info = np.iinfo(small)
        if info.min <= low and high <= info.max:
            return torch.from_numpy(a.astype(small))
    return t


def _dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptGraphError(f"unknown dtype {name!r}")
    return dtype


def graph_to_bytes(graph: CrystalGraph, *, key: str, backbone_version: str) -> bytes:
    """Safetensors bytes of one CrystalGraph (ids are not stored: they belong to the entry)."""
    from safetensors.torch import save

    tensors = {name: getattr(graph, name).detach().contiguous() for name in TENSOR_FIELDS}
    stored = {name: _narrow(t) for name, t in tensors.items()}
    metadata = {
        "dtypes": json.dumps({name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()}),
        "format": FORMAT,
        "key": key,
        "backbone_version": str(backbone_version),
        "atom_graph_cutoff": json.dumps(graph.atom_graph_cutoff),
        "bond_graph_cutoff": json.dumps(graph.bond_graph_cutoff),
        "composition": json.dumps(graph.composition),
        "requires_grad": json.dumps([n for n in TENSOR_FIELDS if getattr(graph, n).requires_grad]),
        "checksum": _checksum(tensors),
    }
    return save(stored, metadata=metadata)


def _header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptGraphError(f"{len(data)} bytes, too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CorruptGraphError(f"header of {size} bytes exceeds the {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise CorruptGraphError(f"unreadable header: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CorruptGraphError("no metadata in header")
    return meta


def _check_shapes(t: dict[str, torch.Tensor]) -> None:
    """Shapes and index ranges consistent with one CrystalGraph; raises CorruptGraphError."""
    n = t["atomic_number"].shape[0] if t["atomic_number"].ndim == 1 else -1
    e = t["atom_graph"].shape[0] if t["atom_graph"].ndim == 2 else -1
    u = t["undirected2directed"].shape[0] if t["undirected2directed"].ndim == 1 else -1
    bond = t["bond_graph"]
    expected = {
        "atomic_number": (n,),
        "atom_frac_coord": (n, 3),
        "lattice": (3, 3),
        "atom_graph": (e, 2),
        "neighbor_image": (e, 3),
        "directed2undirected": (e,),
        "undirected2directed": (u,),
        "bond_graph": (0,) if bond.ndim == 1 else (bond.shape[0], 5),
    }
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape or min(shape, default=0) < 0:
            raise CorruptGraphError(f"{name} has shape {tuple(t[name].shape)}, expected {shape}")
    if 2 * u != e:
        raise CorruptGraphError(f"{e} directed edges != 2 x {u} undirected edges")
    for name in _INDEX_FIELDS:
        if t[name].dtype.is_floating_point:
            raise CorruptGraphError(f"{name} has float dtype {t[name].dtype}")
    bounds = {
        "atom_graph": [n, n],
        "directed2undirected": [u],
        "undirected2directed": [e],
        "bond_graph": [n, u, e, u, e],
    }
    for name, limits in bounds.items():
        x = t[name]
        if x.numel() == 0:
            continue
        cols = x.reshape(x.shape[0], -1)
        if cols.min() < 0 or any(int(cols[:, j].max()) >= lim for j, lim in enumerate(limits)):
            raise CorruptGraphError(f"{name} holds indices out of range")
    if n and (t["atomic_number"].min() < 1 or t["atomic_number"].max() > 118):
        raise CorruptGraphError("atomic numbers out of 1..118")


def graph_from_bytes(
    data: bytes, *, key: str | None = None, backbone_version: str | None = None, graph_id: str | None = None
) -> CrystalGraph:
    """The CrystalGraph stored in ``data``, verified against ``key`` and ``backbone_version`` when
    given; raises CorruptGraphError on any mismatch, bad checksum or inconsistent shape."""
    from chgnet.graph import CrystalGraph
    from safetensors.torch import load

    meta = _header_metadata(data)
    if meta.get("format") != FORMAT:
        raise CorruptGraphError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if key is not None and meta.get("key") != key:
        raise CorruptGraphError(f"stored key {meta.get('key')!r} != expected {key!r}")
    if backbone_version is not None and meta.get("backbone_version") != str(backbone_version):
        raise CorruptGraphError(f"backbone version {meta.get('backbone_version')!r} != {backbone_version!r}")
    try:
        tensors = load(data)
        extra: dict[str, Any] = {
            k: json.loads(meta[k]) for k in ("atom_graph_cutoff", "bond_graph_cutoff", "composition")
        }
        requires_grad = json.loads(meta["requires_grad"])
        dtypes = json.loads(meta["dtypes"])
    except Exception as exc:  # safetensors raises its own error types on truncated data
        raise CorruptGraphError(f"unreadable tensors or metadata: {type(exc).__name__}: {exc}") from exc
    if (
        sorted(tensors) != sorted(TENSOR_FIELDS)
        or not isinstance(dtypes, dict)
        or sorted(dtypes) != sorted(TENSOR_FIELDS)
    ):
        raise CorruptGraphError(f"tensors {sorted(tensors)} != {sorted(TENSOR_FIELDS)}")
    tensors = {name: t.to(_dtype(dtypes[name])) for name, t in tensors.items()}
    if _checksum(tensors) != meta.get("checksum"):
        raise CorruptGraphError("checksum mismatch")
    _check_shapes(tensors)
    for name in requires_grad:
        tensors[name].requires_grad_(True)
    return CrystalGraph(**tensors, **extra, graph_id=graph_id, mp_id=None)


def relabel(graph: CrystalGraph, graph_id: str | None) -> CrystalGraph:
    """The same graph (tensors shared) under another id."""
    from chgnet.graph import CrystalGraph

    return CrystalGraph(**{**graph.to_dict(), "graph_id": graph_id})
