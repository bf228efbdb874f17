"""Class-conditional (Mondrian) conformal intervals (issue 15, item 3): fitted on validation with
crepes, each predicted class covered, stored in the card as plain numbers, old cards unchanged."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import matbalora
from conftest import toy_set
from matbalora.calibration import ConformalIntervals, gaussian_interval
from matbalora.conformal import MondrianIntervals
from matbalora.data.splits import Split
from matbalora.finetune import PreparedData, calibrate_and_score
from matbalora.model_card import check_calibration


def _synthetic(rng, n):
    """Predicted gaps in all four classes; errors 3x larger (relative to std) for predicted 1-3 eV."""
    p_metal = np.where(rng.random(n) < 0.3, 0.9, 0.1)
    gap = np.where(p_metal > 0.5, 0.05, rng.uniform(0.0, 5.0, n))
    std = rng.uniform(0.2, 0.6, n)
    scale = np.where((p_metal < 0.5) & (gap >= 1) & (gap < 3), 3.0, 1.0)
    y = np.maximum(0.0, gap + scale * std * rng.standard_normal(n))
    return gap, std, p_metal, y


def test_each_predicted_class_is_covered_where_one_marginal_quantile_is_not(rng):
    gap, std, pm, y = _synthetic(rng, 4000)
    mondrian = MondrianIntervals.fit(gap, std, pm, y)
    assert mondrian.classes == ["metal", "0-1", "1-3", ">3"] and mondrian.pooled == ()
    g2, s2, p2, y2 = _synthetic(rng, 20000)  # fresh crystals
    lo, hi = mondrian.interval(g2, s2, p2, 0.9)
    mlo, mhi = ConformalIntervals().fit(gap, std, y, 0.9).interval(g2, s2)
    cls = mondrian.classify(g2, p2)
    for c in range(4):
        covered = ((lo <= y2) & (y2 <= hi))[cls == c].mean()
        assert 0.88 <= covered <= 0.93, (mondrian.classes[c], covered)
    hard = cls == 2
    assert ((mlo <= y2) & (y2 <= mhi))[hard].mean() < 0.8  # the marginal quantile under-covers the hard class


def test_quantile_is_the_conformal_order_statistic_of_the_class(rng):
    gap, std, pm, y = _synthetic(rng, 500)
    mondrian = MondrianIntervals.fit(gap, std, pm, y)
    cls = mondrian.classify(gap, pm)
    lo, hi = mondrian.interval(gap, std, pm, 0.8)
    for c in range(4):
        scores = np.sort(np.abs(y - gap)[cls == c] / std[cls == c])
        q = scores[math.ceil((scores.size + 1) * 0.8) - 1]
        assert (hi[cls == c] - gap[cls == c]) / std[cls == c] == pytest.approx(q, abs=2e-6)
    assert np.all(lo >= 0)


def test_small_classes_use_every_validation_crystal_and_nan_stays_nan(rng):
    gap, std, _, y = _synthetic(rng, 200)
    pm = np.zeros_like(gap)  # no predicted metal on validation
    mondrian = MondrianIntervals.fit(gap, std, pm, y)
    assert "metal" in mondrian.pooled and mondrian.scores[0].size == 200
    lo, hi = mondrian.interval(np.array([0.0, 1.0, np.nan]), np.array([0.3, np.nan, 0.3]), np.array([0.9, 0.1, 0.1]), 0.9)
    assert np.isfinite([lo[0], hi[0]]).all() and np.isnan([lo[1], hi[1], lo[2], hi[2]]).all()


def test_card_holds_plain_numbers_and_bad_ones_are_refused(rng):
    mondrian = MondrianIntervals.fit(*_synthetic(rng, 300))
    text = json.dumps(mondrian.to_dict(), allow_nan=False)
    again = MondrianIntervals.from_dict(json.loads(text))
    probe = _synthetic(rng, 50)[:3]
    assert np.array_equal(again.interval(*probe, 0.9), mondrian.interval(*probe, 0.9), equal_nan=True)
    check_calibration({"std_scale": 2.0, "mondrian": mondrian.to_dict()})
    for bad in ({"scores": [[1.0]] * 3}, {"scores": [["1"], [1.0], [1.0], [1.0]]}, {"scores": [[-1.0], [1.0], [1.0], [1.0]]},
                {"scores": [[1.0]] * 4, "gap_edges": [3.0, "x"]}):
        with pytest.raises(ValueError, match="calibration.mondrian"):
            check_calibration({"mondrian": {**mondrian.to_dict(), **bad}})


def _prepared(predictor, n=48):
    structs, gaps = toy_set(n)
    graphs = [predictor.model.structure_to_graph(s) for s in structs]
    split = Split(train=np.arange(0), val=np.arange(0, 32), test=np.arange(32, n), kind="random")
    return PreparedData(ids=[str(i) for i in range(n)], formulas=[s.composition.reduced_formula for s in structs],
                        n_atoms=[len(s) for s in structs], targets=gaps, graphs=graphs, split=split, provenance={})


@pytest.mark.parametrize("kind", ["balora", "lora_ensemble"])
def test_calibrate_and_score_stores_mondrian_and_predict_uses_it(shipped_like, tmp_path, kind):
    from conftest import silicon

    loader = matbalora.load_model if kind == "balora" else matbalora.load_ensemble
    old = loader(shipped_like / kind)
    structs = [silicon(), *toy_set(4)[0]]
    before = old.predict(structs, samples=4)
    g_lo, g_hi = gaussian_interval(before["band_gap"], before["std"], 0.9)
    assert np.allclose(before["lower"], g_lo) and np.allclose(before["upper"], g_hi)  # an old card: the Gaussian, as before

    predictor = loader(shipped_like / kind)
    data = _prepared(predictor if kind == "balora" else predictor.members[0])
    calibration, metrics = calibrate_and_score(predictor, data, samples=4 if kind == "balora" else 0)
    assert {"std_scale", "std_floor", "conformal", "fitted_on", "samples", "mondrian"} <= set(calibration)
    json.dumps(calibration, allow_nan=False)
    assert calibration["mondrian"]["n"][0] + 0 >= 1 and calibration["mondrian"]["kind"] == "MondrianConformal"
    classes = metrics["test_classes"]
    assert {"all", "predicted metal", "predicted 0-1", "true metal", "true non-metal", "true >3"} <= set(classes)
    assert classes["all"]["n"] == 16 and "coverage_90_mondrian" in metrics["test"]

    folder = tmp_path / kind  # the card written with the new calibration, read back
    shutil.copytree(shipped_like / kind, folder)
    card_file = folder / ("config.json" if kind == "balora" else "ensemble.json")
    card = json.loads(card_file.read_text())
    card["calibration"] = calibration
    card_file.write_text(json.dumps(card))
    new = loader(folder)
    after = new.predict(structs, samples=4)
    assert np.allclose(after["band_gap"], before["band_gap"]) and np.allclose(after["std"], predictor.scaler.transform(np.hypot(
        np.nan_to_num(after["std_epistemic"]), np.nan_to_num(after["std_aleatoric"]))))
    lo, hi = new.mondrian.interval(after["band_gap"], after["std"], after["p_metal"], 0.9)
    assert np.allclose(after["lower"], lo) and np.allclose(after["upper"], hi)
