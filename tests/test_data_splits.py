"""Splits: reproducibility, formula grouping, the Matbench folds, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from matbalora.data.splits import (
    MATBENCH_MP_GAP_SIZE,
    Split,
    grouped_split,
    matbench_fold,
    matbench_fold_ids,
    matbench_index_from_ids,
    random_split,
)


def test_random_split_reproducible_and_complete():
    a, b = random_split(1000, seed=3), random_split(1000, seed=3)
    assert a == b and a != random_split(1000, seed=4)
    assert a.sizes() == {"train": 800, "val": 100, "test": 100}
    joined = np.sort(np.concatenate([a.train, a.val, a.test]))
    np.testing.assert_array_equal(joined, np.arange(1000))
    assert random_split(10, fractions=(0.5, 0.0, 0.5)).sizes() == {"train": 5, "val": 0, "test": 5}


@pytest.mark.parametrize("bad", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_named(bad):
    with pytest.raises(ValueError, match="fractions"):
        random_split(10, fractions=bad)


def test_grouped_split_keeps_reduced_formulas_together():
    rng = np.random.default_rng(0)
    pool = ["Fe2O3", "Fe4O6", "NaCl", "Na2Cl2", "Si", "Si2", "GaAs", "MgO", "LiF", "TiO2", "ZnS", "CdTe"]
    formulas = [pool[i] for i in rng.integers(0, len(pool), size=300)]
    split = grouped_split(formulas, seed=1)
    reduced = {"Fe4O6": "Fe2O3", "Na2Cl2": "NaCl", "Si2": "Si"}
    parts = [{reduced.get(formulas[i], formulas[i]) for i in getattr(split, p)} for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(split.sizes().values()) == 300 and split.kind == "grouped"
    assert split == grouped_split(formulas, seed=1)
    assert split.train.size > split.test.size


def test_grouped_split_sizes_follow_fractions():
    formulas = [f"Li{i}O" for i in range(1, 201)]  # 200 distinct reduced formulas
    assert grouped_split(formulas, seed=0).sizes() == {"train": 160, "val": 20, "test": 20}
    with pytest.raises(ValueError, match="Foo"):
        grouped_split(["NaCl", "Foo"])


def test_split_save_load_roundtrip(tmp_path):
    split = random_split(50, seed=7)
    path = tmp_path / "split.json"
    split.save(path)
    split.save(path)  # overwrite in place
    assert Split.load(path) == split
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temp files left
    (tmp_path / "other.json").write_text('{"train": [1]}')
    with pytest.raises(ValueError, match="not a matbalora split"):
        Split.load(tmp_path / "other.json")


def test_split_rejects_overlap():
    with pytest.raises(ValueError, match="overlap"):
        Split(np.array([0, 1]), np.array([1]), np.array([2]), kind="manual")


def test_matbench_fold_sizes_and_golden_rows():
    folds = matbench_fold_ids()
    sizes = np.bincount(folds, minlength=5).tolist()
    assert sizes == [21223, 21223, 21223, 21222, 21222] and sum(sizes) == MATBENCH_MP_GAP_SIZE
    # KFold(5, shuffle=True, random_state=18012019): first rows of the full table and their folds
    assert folds[:12].tolist() == GOLDEN_FIRST_FOLDS
    assert np.flatnonzero(folds == 0)[:5].tolist() == [2, 3, 10, 17, 29]


GOLDEN_FIRST_FOLDS = [4, 4, 0, 0, 2, 3, 3, 2, 2, 2, 0, 1]


def test_matbench_fold_on_a_subset():
    ids = [f"mb-mp-gap-{i + 1:06d}" for i in range(0, MATBENCH_MP_GAP_SIZE, 7)]  # every 7th row
    rows = matbench_index_from_ids(ids)
    split = matbench_fold(rows, fold=2, val_fraction=0.1, seed=0)
    folds = matbench_fold_ids()
    np.testing.assert_array_equal(split.test, np.flatnonzero(folds[rows] == 2))
    assert abs(split.test.size - len(ids) / 5) < 0.02 * len(ids)
    rest = split.train.size + split.val.size
    assert rest + split.test.size == len(ids) and split.val.size == round(0.1 * rest)
    assert split.kind == "matbench_mp_gap/fold_2" and split == matbench_fold(rows, fold=2)
    with pytest.raises(ValueError, match="fold=5"):
        matbench_fold(rows, fold=5)
    with pytest.raises(ValueError, match="not a Matbench id"):
        matbench_index_from_ids(["mp-149"])
