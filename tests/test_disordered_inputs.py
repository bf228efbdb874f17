"""Disordered and doubtful inputs: the CIF site label and what to do, ``--order`` approximants
flagged in ``note``, pymatgen's CIF warnings in ``warning``."""

from __future__ import annotations

import logging

import pandas as pd

import matbalora
from matbalora.cli import main
from matbalora.data.dataset import Rejection
from matbalora.data.readers import read_structures

CELL = ("_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
        "_cell_angle_gamma 90\n")
SITES = "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
ALLOY = "data_d\n" + CELL + "_symmetry_space_group_name_H-M 'P 1'\n" + SITES + "Fe1 Fe 0 0 0 0.5\nCo1 Co 0 0 0 0.5\nO1 O 0.5 0.5 0.5 1\n"
HM_ONLY = "data_s\n" + CELL + "_symmetry_space_group_name_H-M 'P 1'\n" + SITES + "Na1 Na 0 0 0 1\nCl1 Cl 0.5 0.5 0.5 1\n"


def test_disordered_cif_names_its_site_label_and_what_to_do(tmp_path):
    (tmp_path / "alloy.cif").write_text(ALLOY)
    [(sid, rejected)] = read_structures(tmp_path / "alloy.cif")
    assert isinstance(rejected, Rejection) and rejected.reason == "disordered"
    assert "site Co1 " in rejected.detail  # the CIF's label, not pymatgen's index
    assert "ordered supercell" in rejected.detail and "--order" in rejected.detail


def test_order_predicts_an_ordered_approximant_flagged_in_note(shipped_like, tmp_path):
    (tmp_path / "alloy.cif").write_text(ALLOY)
    [(_, approx)] = read_structures(tmp_path / "alloy.cif", order=True)
    assert approx.is_ordered and len(approx) == 4 and approx.composition.reduced_formula == "FeCoO2"
    row = matbalora.screen([tmp_path / "alloy.cif"], samples=2, order=True, progress=False).iloc[0]
    assert row["error"] == "" and row["n_atoms"] == 4 and pd.notna(row["band_gap"])
    assert "ordered approximant" in row["note"] and "Co1" in row["note"] and "2x1x1 supercell" in row["note"]
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "alloy.cif"), "--order", "--samples", "2", "--out", str(out)]) == 0
    assert "ordered approximant" in pd.read_csv(out)["note"].iloc[0]


def test_order_refuses_what_no_small_supercell_orders(tmp_path):
    (tmp_path / "odd.cif").write_text(ALLOY.replace("Fe1 Fe 0 0 0 0.5\nCo1 Co 0 0 0 0.5", "Fe1 Fe 0 0 0 0.09\nCo1 Co 0 0 0 0.91"))
    [(_, rejected)] = read_structures(tmp_path / "odd.cif", order=True)
    assert isinstance(rejected, Rejection) and rejected.reason == "disordered"
    assert "no ordered approximant" in rejected.detail and "ordered supercell" in rejected.detail


def test_cif_warnings_reach_the_warning_column_and_nothing_is_printed(shipped_like, tmp_path, capsys, caplog):
    (tmp_path / "nacl.cif").write_text(HM_ONLY)
    fmt_log = logging.getLogger("matbalora.data.formats")
    level = fmt_log.level
    with caplog.at_level(logging.WARNING):
        frame = matbalora.screen([tmp_path / "nacl.cif"], samples=2, progress=False)
    assert "Spacegroup from _symmetry_space_group_name_H-M used" in frame["warning"].iloc[0]
    assert "Issues encountered" not in frame["warning"].iloc[0]
    assert not [r for r in caplog.records if r.name.startswith("matbalora.data")]
    assert fmt_log.level == level and not fmt_log.filters  # the collector is gone
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "nacl.cif"), "--samples", "2", "--out", str(out)]) == 0
    assert "H-M" in pd.read_csv(out)["warning"].iloc[0]
