"""The shared mp_gap file: the first 200 frames load, validate and match the README's schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matbalora.data.info import summarize
from matbalora.data.readers import load_dataset
from matbalora.data.splits import matbench_fold, matbench_index_from_ids

MP_GAP = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"


@pytest.mark.realdata
def test_first_200_frames_of_mp_gap():
    if not MP_GAP.is_file():
        pytest.skip(f"{MP_GAP} is absent")
    ds = load_dataset(MP_GAP, max_structures=200)
    assert ds.provenance["n_read"] == 200 and len(ds) + len(ds.rejected) == 200
    assert len(ds) >= 195  # the README reports no unreadable frame; a few may fail validation
    assert ds.ids[0] == "mb-mp-gap-000001" and ds.targets[0] == pytest.approx(1.3322)
    assert ds.structures[0].composition.reduced_formula == "KMnO2" and len(ds.structures[0]) == 16
    assert np.all(np.isfinite(ds.targets)) and ds.targets.min() >= 0
    summary = summarize(ds)
    assert 0.2 < summary["metal_fraction"] < 0.7 and summary["atoms"]["max"] <= 200
    split = matbench_fold(matbench_index_from_ids(ds.ids), fold=0)
    assert 0.1 * len(ds) < split.test.size < 0.3 * len(ds)
