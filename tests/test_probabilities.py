"""p_metal and p_window (issue 15, item 4): the predictive mixture, the point mass at 0 eV, and the
columns, window and top-N ranking in predict, screen and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import matbalora
from conftest import copper, rocksalt_nacl, silicon
from matbalora.cli import main
from matbalora.probabilities import METAL_THRESHOLD, check_window, mixture, p_metal, p_window
from matbalora.screen_output import settings_path


def test_one_draw_is_the_recalibrated_gaussian_with_its_mass_at_zero():
    gaps, std = np.array([[0.3, 1.5, -0.2]]), np.array([0.5, 0.4, 0.1])
    assert p_metal(gaps, std) == pytest.approx(norm.cdf((METAL_THRESHOLD - gaps[0]) / std))
    # lo = 0 takes the point mass at 0 eV (the Gaussian below 0); lo > 0 does not
    assert p_window(gaps, std, (0.0, 1.0)) == pytest.approx(norm.cdf((1.0 - gaps[0]) / std))
    assert p_window(gaps, std, (0.5, 2.0)) == pytest.approx(norm.cdf((2.0 - gaps[0]) / std) - norm.cdf((0.5 - gaps[0]) / std))
    assert p_window(gaps, std, (0.0, math.inf)) == pytest.approx(1.0)
    assert p_window(gaps, std, (0.0, METAL_THRESHOLD)) == pytest.approx(p_metal(gaps, std))


def test_mixture_has_the_reported_mean_and_std(rng):
    gaps = rng.normal(1.0, 0.3, size=(16, 5))
    std = np.array([0.5, 1.0, 2.0, 0.31, 0.05])  # the last two below the draws' spread: draws pulled in
    centres, tau = mixture(gaps, std)
    assert centres.mean(0) == pytest.approx(gaps.mean(0))
    assert np.sqrt(centres.var(0) + tau**2) == pytest.approx(std)
    assert tau[-1] == 0 and np.all(tau[:3] > 0)


def test_probabilities_match_sampling_the_rectified_mixture(rng):
    gaps = np.array([[0.1, 1.2], [0.4, 2.6], [-0.1, 1.9]])
    std = np.array([0.35, 0.8])
    centres, tau = mixture(gaps, std)
    pick = rng.integers(0, 3, size=400_000)
    y = np.maximum(0.0, centres[pick] + tau * rng.standard_normal((pick.size, 2)))  # gap = max(0, Y)
    assert p_metal(gaps, std) == pytest.approx((y <= METAL_THRESHOLD).mean(0), abs=3e-3)
    assert p_window(gaps, std, (0.0, 1.0)) == pytest.approx(((y >= 0) & (y <= 1)).mean(0), abs=3e-3)
    assert p_window(gaps, std, (1.0, 2.0)) == pytest.approx(((y >= 1) & (y <= 2)).mean(0), abs=3e-3)


def test_nan_std_gives_nan_and_bad_windows_are_refused():
    assert np.isnan(p_metal(np.array([[1.0]]), np.array([np.nan]))).all()
    for bad in [(2.0, 1.0), (-0.5, 1.0), (1.0,), "ab", (math.nan, 1.0), (1.0, 1.0)]:
        with pytest.raises(ValueError, match="window"):
            check_window(bad)


def test_predict_columns_p_metal_and_p_window(shipped_like):
    model = matbalora.load_model()
    structs = [silicon(), rocksalt_nacl(), copper()]
    df = model.predict(structs, samples=4, window=(1.0, 2.0))
    assert list(df.columns[6:10]) == ["upper", "p_metal", "p_window", "std_epistemic"]
    assert "p_window" not in model.predict(structs, samples=4).columns
    prep = matbalora.predict.prepare(model.model, structs)
    draws = model.gap_draws(prep, samples=4)
    assert df["p_metal"].to_numpy() == pytest.approx(p_metal(draws.gaps, df["std"].to_numpy()))
    assert df["p_window"].to_numpy() == pytest.approx(p_window(draws.gaps, df["std"].to_numpy(), (1.0, 2.0)))
    ens = matbalora.load_ensemble().predict(structs, window=(0.0, 1.0))
    assert ens[["p_metal", "p_window"]].notna().all().all() and (ens["p_window"] >= ens["p_metal"]).all()
    with pytest.raises(ValueError, match="window"):
        model.predict(structs, window=(2.0, 1.0))


def test_screen_ranks_by_p_window_keeps_every_row_in_out_and_refuses_another_window(shipped_like, tmp_path):
    structs = [silicon(), rocksalt_nacl(), copper(), silicon()]
    for k, s in enumerate(structs):
        s.properties["id"] = f"c{k}"
    out = tmp_path / "s.csv"
    best = matbalora.screen(structs, samples=2, window=(0.5, 3.0), top=2, out=out, progress=False)
    written = pd.read_csv(out)
    assert written["id"].tolist() == ["c0", "c1", "c2", "c3"] and "p_window" in written
    expected = written.sort_values("p_window", ascending=False, kind="stable").head(2)
    assert best["id"].tolist() == expected["id"].tolist() and best["p_window"].is_monotonic_decreasing
    assert json.loads(settings_path(out).read_text())["window"] == [0.5, 3.0]
    with pytest.raises(ValueError, match=r"window=\[0.5, 3.0\] there, \[1.0, 2.0\] now"):
        matbalora.screen(structs, samples=2, window=(1.0, 2.0), out=out, progress=False)
    with pytest.raises(ValueError, match="top"):
        matbalora.screen(structs, samples=2, top=2, progress=False)


def test_a_screen_written_before_p_metal_is_not_resumed_into(shipped_like, tmp_path):
    out = tmp_path / "s.csv"
    matbalora.screen([silicon()], samples=2, out=out, progress=False)
    pd.read_csv(out).drop(columns="p_metal").to_csv(out, index=False)  # an older version's columns
    with pytest.raises(ValueError, match="columns of another version"):
        matbalora.screen([silicon(), copper()], samples=2, out=out, progress=False)


def test_cli_window_and_top(shipped_like, tmp_path, capsys):
    from conftest import REPO

    cif = str(REPO / "data" / "examples" / "Si_diamond.cif")
    out = tmp_path / "p.csv"
    assert main(["predict", cif, "--samples", "2", "--window", "1", "2", "--ensemble", "--out", str(out)]) == 0
    cols = list(pd.read_csv(out).columns)
    assert cols.index("p_window") == cols.index("p_metal") + 1 and cols.index("ens_p_window") == cols.index("ens_p_metal") + 1
    capsys.readouterr()
    assert main(["screen", cif, cif, "--samples", "2", "--window", "0", "inf", "--top", "1", "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "top 1 by P(0 eV <= gap <= inf eV)" in text and "1.000" in text
    assert main(["screen", cif, "--top", "1", "--out", str(tmp_path / "t.csv")]) == 2
    assert "--top 1 needs --window" in capsys.readouterr().err
