"""Validation reasons (one structure per reason) and the on_invalid policies."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from matbalora.data import validation as V
from matbalora.data.readers import load_dataset


def validate_structure(structure, **kw):
    """The reason ``check_structure`` gives, or None."""
    found = V.check_structure(structure, **kw)
    return None if found is None else found[0]


def cscl_like() -> Structure:
    return Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


BAD_STRUCTURES = {
    V.EMPTY: lambda: Structure(Lattice.cubic(5.0), [], []),
    V.NON_FINITE: lambda: Structure(Lattice.cubic(5.0), ["Na"], [[np.nan, 0, 0]]),
    V.BAD_LATTICE: lambda: Structure(Lattice([[1, 0, 0], [2, 0, 0], [0, 0, 1]]), ["Na"], [[0, 0, 0]]),
    V.DISORDERED: lambda: Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]]),
    V.OVERLAPPING_ATOMS: lambda: Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.04, 0, 0]]),
    V.ISOLATED_ATOM: lambda: Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]]),
}


@pytest.mark.parametrize("reason", sorted(BAD_STRUCTURES))
def test_each_structure_reason(reason):
    assert validate_structure(BAD_STRUCTURES[reason]()) == reason


def test_good_structure_passes_and_limits_apply():
    assert validate_structure(cscl_like()) is None
    assert validate_structure(cscl_like(), max_atoms=1) == V.TOO_MANY_ATOMS
    # nearest Na-Cl distance is 5.64 * sqrt(3) / 2 = 4.88 Å: overlapping only above that
    assert validate_structure(cscl_like(), min_distance=4.8) is None
    assert validate_structure(cscl_like(), min_distance=5.0) == V.OVERLAPPING_ATOMS
    # 7 Å cell: the lone atom's image is 7 Å away, so a 7.5 Å cutoff finds it
    assert validate_structure(BAD_STRUCTURES[V.ISOLATED_ATOM](), cutoff=7.5) is None


def test_negative_volume_and_nonfinite_lattice():
    left = Structure(Lattice([[5, 0, 0], [0, 5, 0], [0, 0, -5]]), ["Na"], [[0, 0, 0]])
    assert validate_structure(left) == V.BAD_LATTICE
    inf = Structure(Lattice(np.diag([5.0, 5.0, np.inf])), ["Na"], [[0, 0, 0]])
    assert validate_structure(inf) == V.NON_FINITE


class _Huge:
    """Declares a million atoms; touching anything but len() fails the test."""

    def __len__(self):
        return 1_000_000

    def __getattr__(self, name):
        raise AssertionError(f"validation touched .{name} of an oversized structure")


def test_oversized_structure_rejected_before_any_site_access():
    start = time.perf_counter()
    assert validate_structure(_Huge(), max_atoms=500) == V.TOO_MANY_ATOMS
    assert time.perf_counter() - start < 0.1


def test_target_checks():
    assert V.check_target(float("nan"), required=True)[0] == V.MISSING_TARGET
    assert V.check_target(float("nan"), required=False) is None
    assert V.check_target(float("inf"), required=True)[0] == V.NON_FINITE_TARGET
    assert V.check_target(-0.5, required=True)[0] == V.NEGATIVE_TARGET
    assert V.check_target(1.1, required=True) is None
    with pytest.raises(ValueError, match="not a number"):
        V.parse_target("abc")


def _records_file(tmp_path):
    """Eight records: two good, one per target reason, one per a few structure reasons."""
    good = cscl_like().as_dict()
    recs = [
        {"id": "ok-1", "structure": good, "band_gap": 5.0},
        {"id": "no-gap", "structure": good},
        {"id": "inf-gap", "structure": good, "band_gap": float("inf")},
        {"id": "neg-gap", "structure": good, "band_gap": -1.0},
        {"id": "text-gap", "structure": good, "band_gap": "n/a"},
        {"id": "lonely", "structure": BAD_STRUCTURES[V.ISOLATED_ATOM]().as_dict(), "band_gap": 1.0},
        {"id": "ok-2", "structure": good, "band_gap": 4.0},
        {"id": "ok-1", "structure": good, "band_gap": 3.0},
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(recs))
    return path


def test_skip_policy_records_every_rejection(tmp_path):
    ds = load_dataset(_records_file(tmp_path), on_invalid="skip")
    assert ds.ids == ["ok-1", "ok-2"]
    np.testing.assert_allclose(ds.targets, [5.0, 4.0])
    assert {r.id_or_path: r.reason for r in ds.rejected} == {
        "no-gap": V.MISSING_TARGET,
        "inf-gap": V.NON_FINITE_TARGET,
        "neg-gap": V.NEGATIVE_TARGET,
        "text-gap": V.NON_FINITE_TARGET,
        "lonely": V.ISOLATED_ATOM,
        "ok-1": V.DUPLICATE_ID,
    }
    assert ds.rejection_counts() == {
        V.NON_FINITE_TARGET: 2,
        V.MISSING_TARGET: 1,
        V.NEGATIVE_TARGET: 1,
        V.ISOLATED_ATOM: 1,
        V.DUPLICATE_ID: 1,
    }
    assert ds.provenance["n_read"] == 8 and ds.provenance["n_rejected"] == 6


def test_error_policy_names_entry_and_reason(tmp_path):
    with pytest.raises(ValueError, match=r"'no-gap'.*missing_target"):
        load_dataset(_records_file(tmp_path), on_invalid="error")


def test_warn_policy_logs_and_keeps_list(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="matbalora.data.validation"):
        ds = load_dataset(_records_file(tmp_path), on_invalid="warn")
    assert len(ds.rejected) == 6
    assert sum("lonely" in r.getMessage() and "isolated_atom" in r.getMessage() for r in caplog.records) == 1


def test_require_target_false_keeps_nan(tmp_path):
    ds = load_dataset(_records_file(tmp_path), require_target=False)
    assert "no-gap" in ds.ids and np.isnan(ds.targets[ds.ids.index("no-gap")])


def test_bad_policy_named():
    with pytest.raises(ValueError, match="on_invalid='ignore'"):
        V.check_policy("ignore")
