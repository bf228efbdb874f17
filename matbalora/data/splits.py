"""Train/validation/test splits: random, grouped by reduced formula, and the Matbench folds.

Matbench v0.1 (``matbench_mp_gap``, 106,113 rows) scores models with
``sklearn.model_selection.KFold(n_splits=5, shuffle=True, random_state=18012019)`` over the row
order of the matminer dataset (matbench ``scripts/mvb01_generate_validation.py``); row ``i`` has
the Matbench id ``mb-mp-gap-{i + 1:06d}``. ``matbench_fold`` rebuilds those folds from row
indices, so the subset of rows present locally keeps its official test fold.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from matbalora.atomic import write_json

MATBENCH_SEED = 18012019
MATBENCH_N_SPLITS = 5
MATBENCH_MP_GAP_SIZE = 106_113
_MBID = re.compile(r"mb-mp-gap-(\d+)")
_FORMAT = "matbalora.split/1"


def _as_index(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    if arr.min() < 0:
        raise ValueError(f"{name} has negative index {int(arr.min())}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays into one dataset (int64, sorted, disjoint). ``kind`` names the recipe
    (``random``, ``grouped``, ``matbench_mp_gap/fold_K``); ``seed`` is the seed it used."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    kind: str
    seed: int | None = None

    def __post_init__(self) -> None:
        parts = {}
        for name in ("train", "val", "test"):
            parts[name] = _as_index(getattr(self, name), name)
            object.__setattr__(self, name, parts[name])
        joined = np.concatenate(list(parts.values()))
        if np.unique(joined).size != joined.size:
            raise ValueError("train, val and test indices overlap or repeat")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.seed == other.seed
            and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in ("train", "val", "test"))
        )

    __hash__ = None  # type: ignore[assignment]

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.size), "val": int(self.val.size), "test": int(self.test.size)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "seed": self.seed,
            **{k: getattr(self, k).tolist() for k in ("train", "val", "test")},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically (``matbalora.atomic``: temp file in the same folder, then ``os.replace``)."""
        write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a matbalora split file (format {_FORMAT!r})")
        missing = [k for k in ("kind", "train", "val", "test") if k not in data]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} lacks {missing}")
        return cls(
            train=np.asarray(data["train"], dtype=np.int64),
            val=np.asarray(data["val"], dtype=np.int64),
            test=np.asarray(data["test"], dtype=np.int64),
            kind=str(data["kind"]),
            seed=data.get("seed"),
        )


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not (0.0 <= f <= 1.0) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions={tuple(fractions)!r}; need three values in [0, 1] summing to 1")
    return fr  # type: ignore[return-value]


def _cuts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    first = int(round(fractions[0] * n))
    second = min(n, first + int(round(fractions[1] * n)))
    return first, second


def random_split(n: int, *, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """A uniform random split of ``range(n)``; the same (n, fractions, seed) gives the same split."""
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n={n!r}; must be a non-negative integer")
    fr = _check_fractions(fractions)
    perm = np.random.default_rng(seed).permutation(int(n))
    a, b = _cuts(int(n), fr)
    return Split(np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]), kind="random", seed=seed)


def reduced_formulas(formulas: Sequence[Any]) -> list[str]:
    """pymatgen reduced formulas of formula strings, Compositions or Structures."""
    from pymatgen.core import Composition

    cache: dict[str, str] = {}
    out = []
    for item in formulas:
        if hasattr(item, "composition"):
            out.append(item.composition.reduced_formula)
            continue
        if isinstance(item, Composition):
            out.append(item.reduced_formula)
            continue
        key = str(item)
        if key not in cache:
            try:
                cache[key] = Composition(key).reduced_formula
            except Exception as exc:
                raise ValueError(f"cannot parse formula {item!r}: {exc}") from exc
        out.append(cache[key])
    return out


def grouped_split(formulas: Sequence[Any], *, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """A random split of whole groups of entries sharing a reduced formula (``Fe2O3`` and
    ``Fe4O6`` together), so no reduced formula appears in two parts. Part sizes follow
    ``fractions`` up to one group."""
    fr = _check_fractions(fractions)
    groups = reduced_formulas(formulas)
    names, inverse = np.unique(np.array(groups, dtype=str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    starts = np.concatenate([[0], np.cumsum(counts[order])[:-1]])  # entries before each group
    a, b = _cuts(len(groups), fr)
    part_of_group = np.empty(len(names), dtype=np.int64)
    part_of_group[order] = np.where(starts < a, 0, np.where(starts < b, 1, 2))
    part = part_of_group[inverse]
    idx = np.arange(len(groups))
    return Split(idx[part == 0], idx[part == 1], idx[part == 2], kind="grouped", seed=seed)


def matbench_fold_ids(n_total: int = MATBENCH_MP_GAP_SIZE) -> np.ndarray:
    """[n_total] the Matbench test fold (0-4) of every row of the full dataset."""
    from sklearn.model_selection import KFold

    folds = np.empty(n_total, dtype=np.int64)
    kfold = KFold(n_splits=MATBENCH_N_SPLITS, shuffle=True, random_state=MATBENCH_SEED)
    for k, (_, test) in enumerate(kfold.split(np.zeros((n_total, 1)))):
        folds[test] = k
    return folds


def matbench_index_from_ids(ids: Sequence[str]) -> np.ndarray:
    """Matbench row indices (0-based) from ids ``mb-mp-gap-NNNNNN`` (row = NNNNNN - 1)."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, entry in enumerate(ids):
        m = _MBID.fullmatch(str(entry))
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"id {entry!r} is not a Matbench id 'mb-mp-gap-NNNNNN'")
        out[i] = int(m.group(1)) - 1
    return out


def matbench_fold(
    matbench_indices: Sequence[int] | np.ndarray,
    fold: int = 0,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_total: int = MATBENCH_MP_GAP_SIZE,
) -> Split:
    """The official Matbench test fold ``fold`` for a dataset whose entry ``i`` is row
    ``matbench_indices[i]`` of ``matbench_mp_gap``; the other rows are split at random into
    train and validation (``val_fraction`` of them, ``seed``). Indices refer to dataset positions.
    """
    if fold not in range(MATBENCH_N_SPLITS):
        raise ValueError(f"fold={fold!r}; Matbench has folds 0..{MATBENCH_N_SPLITS - 1}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}; must be in [0, 1)")
    rows = _as_index(matbench_indices, "matbench_indices")
    if rows.size and rows.max() >= n_total:
        raise ValueError(f"matbench index {int(rows.max())} >= dataset size {n_total}")
    if np.unique(rows).size != rows.size:
        raise ValueError("matbench_indices repeat a row")
    in_test = matbench_fold_ids(n_total)[rows] == fold
    positions = np.arange(rows.size)
    rest = positions[~in_test]
    perm = np.random.default_rng(seed).permutation(rest)
    n_val = int(round(val_fraction * rest.size))
    return Split(
        np.sort(perm[n_val:]), np.sort(perm[:n_val]), positions[in_test], kind=f"matbench_mp_gap/fold_{fold}", seed=seed
    )
