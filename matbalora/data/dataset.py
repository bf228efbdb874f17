"""The in-memory band-gap dataset: validated structures, targets, ids, provenance, rejections."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.core import Structure


@dataclass(frozen=True)
class Rejection:
    """One input entry that was not admitted, and why.

    ``id_or_path``: the entry id, or ``path#frame`` / the file path when no id could be read;
    ``reason``: one of ``matbalora.data.validation.REASONS``; ``detail``: a human-readable note;
    ``source``: where the entry came from, ``path`` or ``path#position`` ("" when not from a file).
    """

    id_or_path: str
    reason: str
    detail: str = ""
    source: str = ""


@dataclass(frozen=True, eq=False)
class BandGapDataset:
    """Structures with their band gaps.

    ``structures``: pymatgen Structures (ordered, validated);
    ``targets``: [n] float64 band gap, eV (NaN where unknown, prediction-only entries);
    ``ids``: [n] unique strings; ``provenance``: small JSON-serialisable description of the
    source; ``rejected``: every input entry that was not admitted (never dropped silently).
    """

    structures: list[Structure]
    targets: np.ndarray
    ids: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)

    def __post_init__(self) -> None:
        targets = np.asarray(self.targets, dtype=np.float64)
        if targets.ndim != 1:
            raise ValueError(f"targets must be 1-D, got shape {targets.shape}")
        object.__setattr__(self, "targets", targets)
        n = len(self.structures)
        if len(targets) != n or len(self.ids) != n:
            raise ValueError(
                f"structures ({n}), targets ({len(targets)}) and ids ({len(self.ids)}) must have equal length"
            )
        if len(set(self.ids)) != n:
            dupes = [k for k, c in Counter(self.ids).items() if c > 1][:5]
            raise ValueError(f"ids must be unique; repeated: {dupes}")

    def __len__(self) -> int:
        return len(self.structures)

    def __repr__(self) -> str:
        return f"BandGapDataset(n={len(self)}, rejected={len(self.rejected)}, source={self.provenance.get('source')!r})"

    def subset(self, indices: Sequence[int] | np.ndarray) -> BandGapDataset:
        """The entries at ``indices`` (ints, in that order); provenance and rejections are kept."""
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"indices out of range for a dataset of {len(self)} entries")
        idx = np.where(idx < 0, idx + len(self), idx)
        provenance = {**self.provenance, "subset_of": len(self), "n_subset": int(idx.size)}
        return BandGapDataset(
            structures=[self.structures[i] for i in idx],
            targets=self.targets[idx],
            ids=[self.ids[i] for i in idx],
            provenance=provenance,
            rejected=list(self.rejected),
        )

    def rejection_counts(self) -> dict[str, int]:
        """Number of rejected entries per reason, most frequent first."""
        return dict(Counter(r.reason for r in self.rejected).most_common())

    def to_frame(self) -> pd.DataFrame:
        """One row per entry: id, formula (reduced), n_atoms, band_gap (eV)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "id": list(self.ids),
                "formula": [s.composition.reduced_formula for s in self.structures],
                "n_atoms": np.array([len(s) for s in self.structures], dtype=np.int64),
                "band_gap": self.targets.copy(),
            }
        )
