"""Dataset summaries: golden values on a tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from matbalora.data.dataset import BandGapDataset, Rejection
from matbalora.data.info import format_summary, summarize


def tiny() -> BandGapDataset:
    a = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    b = Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])
    c = Structure(Lattice.cubic(5.0), ["Mg", "O", "O", "Si"], [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    return BandGapDataset(
        [a, b, c, b.copy()],
        np.array([5.0, 0.0, 2.0, np.nan]),
        ["a", "b", "c", "d"],
        {"source": "unit"},
        [Rejection("x", "isolated_atom", ""), Rejection("y", "isolated_atom", ""), Rejection("z", "empty", "")],
    )


def test_summary_golden_values():
    s = summarize(tiny())
    assert s["count"] == 4 and s["n_with_target"] == 3 and s["n_rejected"] == 3
    assert s["rejections"] == {"isolated_atom": 2, "empty": 1}
    assert s["metal_fraction"] == pytest.approx(1 / 3)
    gap = s["band_gap"]
    assert (gap["min"], gap["median"], gap["max"]) == (0.0, 2.0, 5.0)
    assert gap["mean"] == pytest.approx(7 / 3) and gap["median_nonzero"] == pytest.approx(3.5)
    assert gap["p25"] == pytest.approx(1.0) and gap["p75"] == pytest.approx(3.5)
    assert s["atoms"]["min"] == 1 and s["atoms"]["max"] == 4 and s["atoms"]["mean"] == pytest.approx(2.0)
    assert s["elements"] == ["Cl", "Cu", "Mg", "Na", "O", "Si"]


def test_format_summary_text():
    text = format_summary(summarize(tiny()))
    assert "structures: 4 (3 with a band gap)" in text
    assert "rejected: 3 (isolated_atom 2, empty 1)" in text
    assert "metals (gap 0): 33.3 %" in text and "elements (6): Cl Cu Mg Na O Si" in text
    assert "band gap, eV: min 0, p10 0.4" in text


def test_summary_without_targets():
    ds = tiny().subset([3])
    s = summarize(ds)
    assert s["metal_fraction"] is None and s["band_gap"] is None
    assert "band gap, eV: n/a" in format_summary(s)
