"""Prediction API, CLI and screening on tiny model folders: columns, order, bad input, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase.build import bulk

import matbalora
from conftest import REPO, copper, rocksalt_nacl, silicon
from matbalora.cli import main

EXAMPLES = REPO / "data" / "examples"
BASE_COLUMNS = ["id", "formula", "n_atoms", "band_gap", "std", "lower", "upper"]


def test_load_model_predict_columns_order_and_bounds(shipped_like):
    model = matbalora.load_model()
    structs = [silicon(), bulk("Cu", "fcc", a=3.6), rocksalt_nacl()]
    df = model.predict(structs, samples=8, level=0.9)
    assert list(df.columns[:7]) == BASE_COLUMNS and len(df) == 3
    assert df["n_atoms"].tolist() == [2, 1, 8]  # input order; ASE Atoms accepted
    assert (df["lower"] >= 0).all() and (df["lower"] <= df["band_gap"]).all() and (df["band_gap"] <= df["upper"]).all()
    assert (df["std"] > 0).all()
    det = model.predict(structs, samples=0)
    assert det["std"].isna().all() and det["band_gap"].notna().all()
    wider = model.predict(structs, samples=8, level=0.99)
    assert (wider["upper"] - wider["lower"] >= df["upper"] - df["lower"] - 1e-9).all()


def test_ensemble_predicts_spread(shipped_like):
    ens = matbalora.load_ensemble()
    df = ens.predict([silicon(), copper()])
    assert list(df.columns[:7]) == BASE_COLUMNS and (df["std"] > 0).all()


def test_an_ensemble_member_with_several_gap_heads_adds_their_spread(shipped_like):
    import torch

    from matbalora.head import BandGapHead, gap_only_config
    from matbalora.predict import prepare

    ens = matbalora.load_ensemble()
    prep = prepare(ens.model, [silicon(), copper(), rocksalt_nacl()], None)
    before = ens.gap_draws(prep).gaps
    member = ens.members[0].model
    torch.manual_seed(3)
    member.head = member.head.with_gap_members([BandGapHead(member.head.in_dim, gap_only_config(member.head.config)).eval()]).eval()
    member.head_config = member.head.config
    heads = member.sample_gaps(prep.graphs, samples=0).gaps  # [2, n]: the old head, then the new one
    after = ens.gap_draws(prep).gaps
    assert after.shape == (before.shape[0] + 1, before.shape[1])
    np.testing.assert_allclose(after[:2], heads, atol=1e-6)  # both heads of member 0 are samples
    np.testing.assert_allclose(after[2:], before[1:], atol=1e-6)
    np.testing.assert_allclose(ens.member_gaps(prep)[0], heads.mean(0), atol=1e-6)  # the member's own prediction
    assert not np.allclose(ens.predict_prepared(prep)["std_epistemic"], before.std(0, ddof=1))


def test_std_is_the_cards_recalibration_of_the_raw_spread(shipped_like):
    """std = sqrt((k raw)^2 + c^2) with k, c from the card; the raw spread stays in std_epistemic."""
    from matbalora.calibration import StdScaler

    model = matbalora.load_model()
    structs = [silicon(), copper()]
    raw = model.predict(structs, samples=8)["std_epistemic"].to_numpy()
    assert model.scaler.floor == 0.0  # the fixture's card predates the floor: it loads as 0
    np.testing.assert_allclose(model.predict(structs, samples=8)["std"], 1.5 * raw)
    model.scaler = StdScaler.from_calibration({"std_scale": 1.5, "std_floor": 0.4})
    df = model.predict(structs, samples=8)
    np.testing.assert_allclose(df["std"], np.hypot(1.5 * raw, 0.4))
    np.testing.assert_allclose(df["std_epistemic"], raw)
    assert (df["upper"] - df["band_gap"] >= 1.64 * 0.4).all()


def test_invalid_structure_keeps_its_row(shipped_like):
    from pymatgen.core import Lattice, Structure

    clash = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    df = matbalora.load_model().predict([silicon(), clash], samples=4)
    assert df["error"].tolist()[0] == "" and df["error"].tolist()[1].startswith("overlapping_atoms")
    assert np.isnan(df["band_gap"].iloc[1]) and np.isfinite(df["band_gap"].iloc[0])


def _bad_inputs(folder: Path) -> dict[str, str]:
    (folder / "empty.cif").write_text("")
    (folder / "garbage.cif").write_text("data_x\n_cell_length_a banana\nloop_\n")
    (folder / "disordered.cif").write_text(
        "data_d\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
        "_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
        "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\nFe1 Fe 0 0 0 0.5\nCo1 Co 0 0 0 0.5\nO1 O 0.5 0.5 0.5 1\n"
    )
    (folder / "overlap.vasp").write_text("clash\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\nDirect\n0 0 0\n0.01 0 0\n")
    return {"empty": "empty", "garbage": "unparsable", "disordered": "disordered", "overlap": "overlapping_atoms"}


def test_cli_predict_bad_inputs_reported_rest_written(shipped_like, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    shutil.copytree(EXAMPLES, inputs)
    expected = _bad_inputs(inputs)
    out = tmp_path / "pred.csv"
    code = main(["predict", str(inputs), "--ensemble", "--samples", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == len(expected) and all(line.startswith("error: ") for line in err)
    assert "Traceback" not in "\n".join(err)
    for stem, reason in expected.items():
        assert any(stem in line and reason in line for line in err), (stem, err)
    df = pd.read_csv(out)
    good = sorted(p.stem for p in EXAMPLES.glob("*.cif"))
    assert sorted(df["id"]) == good
    assert {"ens_band_gap", "ens_std", "ens_lower", "ens_upper"} <= set(df.columns)
    assert (df["lower"] >= 0).all() and (df["ens_lower"] >= 0).all()


def test_cli_predict_strict_stops_and_clean_run_exits_zero(shipped_like, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    shutil.copytree(EXAMPLES, inputs)
    assert main(["predict", str(inputs), "--samples", "2", "--out", str(tmp_path / "ok.json")]) == 0
    assert len(pd.read_json(tmp_path / "ok.json")) == len(list(EXAMPLES.glob("*.cif")))
    _bad_inputs(inputs)
    capsys.readouterr()
    assert main(["predict", str(inputs), "--strict", "--out", str(tmp_path / "strict.csv")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "strict.csv").exists()


def test_cli_table_on_stdout(shipped_like, capsys):
    assert main(["predict", str(EXAMPLES / "Si_diamond.cif"), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "Si_diamond" in out and "band_gap" in out and "lower" in out


def test_screen_resumes_without_loss_or_duplicates(shipped_like, tmp_path):
    inputs = sorted(EXAMPLES.glob("*.cif"))
    full = matbalora.screen(inputs, samples=2, batch_size=2, out=tmp_path / "full.csv", progress=False)
    assert len(full) == len(inputs)
    text = (tmp_path / "full.csv").read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(text[:4]) + text[4][: len(text[4]) // 2])  # header, 3 rows, torn 4th row
    shutil.copy(tmp_path / "full.csv.settings.json", tmp_path / "partial.csv.settings.json")
    resumed = matbalora.screen(inputs, samples=2, batch_size=2, out=partial, progress=False)
    a, b = pd.read_csv(tmp_path / "full.csv"), pd.read_csv(partial)
    assert a["id"].tolist() == b["id"].tolist()
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)
    assert len(resumed) == len(inputs)
    with pytest.raises(ValueError, match="other inputs"):
        matbalora.screen(inputs[::-1], samples=2, batch_size=2, out=partial, progress=False)


def test_cli_evaluate_scores_raw_and_recalibrated_spread(shipped_like, tmp_path):
    """`matbalora evaluate`: metrics before recalibration use the raw spread, after it the card's
    (here k = 1.5, no floor); predictions.csv holds both models' columns."""
    import json

    from ase.io import write

    frames = []
    for k, atoms in enumerate([silicon().to_ase_atoms(), rocksalt_nacl().to_ase_atoms(), bulk("Cu", "fcc", a=3.6)] * 2):
        atoms = atoms.copy()
        atoms.info.update(band_gap=[0.6, 5.0, 0.0][k % 3], material_id=f"e{k}")
        frames.append(atoms)
    write(tmp_path / "labelled.extxyz", frames, format="extxyz")
    assert main(["evaluate", "--data", str(tmp_path / "labelled.extxyz"), "--ensemble", "--samples", "4", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["n"] == 6 and {"calibrated", "uncalibrated"} <= set(report["model"]) and "ensemble" in report
    table = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert {"model_std", "ensemble_std", "band_gap_true"} <= set(table.columns)
    raw = matbalora.load_model().predict(frames, samples=4)["std_epistemic"].to_numpy()  # same crystals, same draws
    np.testing.assert_allclose(table["model_std"], 1.5 * raw, rtol=1e-5)
