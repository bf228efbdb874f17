"""The benchmark split of ``shared/data/mp_gap``: Matbench fold 0 test entries as the test pool,
seeded subsets for train / validation / test, validated, graphs from the on-disk cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from matbalora.data.entries import build_dataset
from matbalora.data.extxyz import read_extxyz
from matbalora.data.formats import atoms_entry
from matbalora.data.graph_cache import GraphCache
from matbalora.data.splits import Split, matbench_fold_ids
from matbalora.finetune import PreparedData, default_cache_dir
from matbalora.model import BandGapModel

REPO = Path(__file__).resolve().parents[1]
MP_GAP = REPO.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"


@dataclass(frozen=True)
class SplitSizes:
    n_train: int
    n_val: int
    n_test: int
    seed: int = 0


def select_rows(matbench_index: np.ndarray, sizes: SplitSizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (into the file) of train / val / test: test from Matbench fold 0, the rest from
    the other folds, each a seeded random subset."""
    fold = matbench_fold_ids()[matbench_index]
    rng = np.random.default_rng(sizes.seed)
    test_pool = np.flatnonzero(fold == 0)
    rest = np.flatnonzero(fold != 0)
    test = np.sort(rng.choice(test_pool, sizes.n_test, replace=False))
    other = rng.choice(rest, sizes.n_train + sizes.n_val, replace=False)
    return np.sort(other[: sizes.n_train]), np.sort(other[sizes.n_train :]), test


@lru_cache(maxsize=1)
def read_frames(path: Path = MP_GAP) -> list:
    return read_extxyz(path)


def composition_rows(sizes: SplitSizes, n: int, *, path: Path = MP_GAP) -> tuple[list[str], np.ndarray]:
    """Reduced formulas and gaps of ``n`` seeded rows from the non-test folds, none of them in the
    benchmark's validation subset (for the composition baseline trained at a larger size)."""
    frames = read_frames(path)
    mb_index = np.array([int(a.info["matbench_index"]) for a in frames])
    _, val, _ = select_rows(mb_index, sizes)
    pool = np.setdiff1d(np.flatnonzero(matbench_fold_ids()[mb_index] != 0), val)
    rows = np.sort(np.random.default_rng(sizes.seed + 1).choice(pool, min(n, len(pool)), replace=False))
    return [frames[i].get_chemical_formula(empirical=True) for i in rows], np.array([float(frames[i].info["band_gap"]) for i in rows])


def load_benchmark_data(sizes: SplitSizes, model: BandGapModel, *, path: Path = MP_GAP, workers: int = 1, progress: bool = True) -> PreparedData:
    frames = read_frames(path)
    mb_index = np.array([int(a.info["matbench_index"]) for a in frames])
    parts = select_rows(mb_index, sizes)
    order = np.concatenate(parts)
    entries = (atoms_entry(frames[i], str(frames[i].info["material_id"]), target_key="band_gap", max_atoms=500) for i in order)
    ds = build_dataset(entries, provenance={"source": str(path), "protocol": "matbench_mp_gap fold 0 test pool", **sizes.__dict__})
    kept = {sid: k for k, sid in enumerate(ds.ids)}
    split_positions = []
    for part in parts:
        ids = [str(frames[i].info["material_id"]) for i in part]
        split_positions.append(np.array([kept[s] for s in ids if s in kept], dtype=np.int64))
    split = Split(*split_positions, kind="matbench_mp_gap/fold_0 subsets", seed=sizes.seed)
    cache = GraphCache(default_cache_dir(), converter=model.backbone.graph_converter, backbone_version=model.backbone_version)
    graphs = cache.graphs(ds.structures, ids=ds.ids, workers=workers, progress=progress)
    return PreparedData(
        ids=list(ds.ids),
        formulas=[s.composition.reduced_formula for s in ds.structures],
        n_atoms=[len(s) for s in ds.structures],
        targets=ds.targets,
        graphs=graphs,
        split=split,
        provenance=dict(ds.provenance, rejected=ds.rejection_counts(), n_loaded=len(ds)),
    )


class MagpieFeatures:
    """Magpie composition features (matminer ``ElementProperty``), memoised per formula: the inputs
    of the composition random forest every benchmark compares with."""

    def __init__(self) -> None:
        from matminer.featurizers.composition import ElementProperty

        self.featurizer = ElementProperty.from_preset("magpie")
        self.memo: dict[str, list] = {}

    def __call__(self, formulas) -> np.ndarray:
        from pymatgen.core import Composition

        for f in set(formulas) - self.memo.keys():
            self.memo[f] = self.featurizer.featurize(Composition(f))
        return np.nan_to_num(np.array([self.memo[f] for f in formulas], dtype=float))
