"""Golden-value tests for matbalora.metrics: expected numbers are worked out by hand."""

import math
import warnings

import numpy as np
import pytest

from matbalora import metrics as M

# A tiny case worked by hand: errors y_pred - y_true = [0, 0, 1, -2].
YP = np.array([1.0, 2.0, 3.0, 0.0])
YT = np.array([1.0, 2.0, 2.0, 2.0])
YS = np.array([1.0, 1.0, 1.0, 1.0])


def test_mae_rmse_by_hand():
    assert M.mae(YP, YS, YT) == pytest.approx(3 / 4)
    assert M.rmse(YP, YS, YT) == pytest.approx(math.sqrt(5 / 4))


def test_r2_by_hand():
    # SS_res = 1, SS_tot = 1 + 0 + 1 = 2
    assert M.r2([1.0, 2.0, 4.0], [0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert M.r2([1.0, 2.0, 3.0], [0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == 1.0
    assert math.isnan(M.r2([1.0, 2.0], [0.1, 0.1], [2.0, 2.0]))


def test_spearman_by_hand():
    # |err| ranks 1,2,3 vs std ranks 1,3,2: rho = 1 - 6 * 2 / (3 * 8) = 0.5
    yt = np.zeros(3)
    assert M.spearman([1.0, 2.0, 3.0], [0.1, 0.3, 0.2], yt) == pytest.approx(0.5)
    assert M.spearman([1.0, 2.0, 3.0], [0.3, 0.2, 0.1], yt) == pytest.approx(-1.0)


def test_spearman_nan_when_undefined():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN must come without scipy's ConstantInputWarning
        assert math.isnan(M.spearman([1.0, 2.0, 3.0], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]))
        assert math.isnan(M.spearman([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]))
        assert math.isnan(M.spearman([1.0], [0.1], [0.0]))


def test_nll_by_hand_and_floor():
    # err 1, std 1: 0.5 log(2 pi) + 0.5; err 0, std 2: 0.5 log(8 pi)
    got = M.nll([1.0, 3.0], [1.0, 2.0], [0.0, 3.0])
    want = ((0.5 * math.log(2 * math.pi) + 0.5) + 0.5 * math.log(8 * math.pi)) / 2
    assert got == pytest.approx(want)
    # std 0 is floored at 1e-3 eV: err 0.001 -> 0.5 log(2 pi 1e-6) + 0.5
    floored = M.nll([0.001], [0.0], [0.0])
    assert floored == pytest.approx(0.5 * math.log(2 * math.pi * 1e-6) + 0.5)
    with pytest.raises(ValueError, match="std_floor"):
        M.nll([0.0], [1.0], [0.0], std_floor=0.0)


def test_miscalibration_area_exact_predictions():
    # every error 0: observed = 1 on the whole grid, area = int_0^1 (1 - p) dp = 1/2
    assert M.miscalibration_area([1.0, 2.0], [0.5, 0.1], [1.0, 2.0]) == pytest.approx(0.5)


def test_miscalibration_area_hopeless_stds():
    # |err| >> std: observed = 0 except at p = 1 (z = inf). With grid step h = 1/99 the
    # curve is -p up to 98/99, then a line back to 0: area = 0.5 * 98/99.
    got = M.miscalibration_area([5.0, 0.0], [1e-9, 1e-9], [0.0, 5.0])
    assert got == pytest.approx(0.5 * 98 / 99)


def test_miscalibration_area_crossing_curve():
    # one crystal with |err| = std on the grid [0, .5, 1]: z = [0, 0.674, inf], so it is
    # inside only at expected = 1
    e, o = M.interval_proportions([1.0], [1.0], [2.0], num_bins=3)
    np.testing.assert_array_equal(e, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(o, [0.0, 0.0, 1.0])
    # d = o - e = [0, -.5, 0]: area = 2 triangles of base .5, height .5 = 0.25
    assert M.miscalibration_area([1.0], [1.0], [2.0], num_bins=3) == pytest.approx(0.25)
    # two crystals, errors 0 and 10 std: o = [.5, .5, 1], d = [.5, 0, 0] -> area .125
    got = M.miscalibration_area([0.0, 0.0], [1.0, 1.0], [0.0, 10.0], num_bins=3)
    assert got == pytest.approx(0.125)
    # sign change inside a segment: o = [.5, .5, .5, 1] on e = [0, 1/3, 2/3, 1]
    # d = [.5, 1/6, -1/6, 0]: trapezoid (1/3)(.5+1/6)/2 + two small triangles
    got = M.miscalibration_area([0.0, 0.0], [1.0, 1.0], [0.0, 10.0], num_bins=4)
    want = (1 / 3) * (0.5 + 1 / 6) / 2 + 2 * (0.5 * (1 / 6) * (1 / 6)) + 0.5 * (1 / 3) * (1 / 6)
    assert got == pytest.approx(want)


def test_miscalibration_area_small_for_calibrated_gaussian():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.1, 0.5, 20000)
    yp = rng.uniform(0.5, 5.0, 20000)
    yt = yp + s * rng.normal(size=20000)
    assert M.miscalibration_area(yp, s, yt) < 0.01
    assert M.miscalibration_area(yp, 0.5 * s, yt) > 0.15


def test_ence_by_hand():
    # bins by std: {1, 1} with errors {1, 1} -> 0; {2, 2} with errors {1, 3} -> RMSE sqrt5
    got = M.ence([1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], num_bins=2)
    assert got == pytest.approx((0 + abs(2 - math.sqrt(5)) / 2) / 2)
    # perfect predictions: every bin has RMSE 0, each term |RMV - 0| / RMV = 1
    assert M.ence(YT, YS, YT) == pytest.approx(1.0)


def test_coverage_by_hand_and_clipping():
    # |err| = .5, 1, 1.5, 1 against std 1: inclusive 1-sigma covers 3 of 4
    yp = np.ones(4)
    yt = np.array([1.5, 2.0, 2.5, 0.0])
    assert M.coverage_68(yp, np.ones(4), yt) == pytest.approx(0.75)
    assert M.coverage_90(yp, np.ones(4), yt) == pytest.approx(1.0)
    # 1.645 < 1.7 < 1.96: outside 90%, inside 95%
    assert M.coverage_90([0.0], [1.0], [1.7]) == 0.0
    assert M.coverage_95([0.0], [1.0], [1.7]) == 1.0
    # an interval wholly below 0 is clipped to [0, 0] and covers a metal
    assert M.coverage_95([-5.0], [1.0], [0.0]) == 1.0
    assert M.coverage(0.5).__name__ == "coverage_50"
    with pytest.raises(ValueError, match="level"):
        M.coverage(95)


def test_mean_interval_width_90_by_hand():
    z = 1.6448536269514722  # Phi^-1(0.95)
    # [1 - z, 1 + z] clipped to [0, 1 + z]; [3 - z, 3 + z] unclipped
    got = M.mean_interval_width_90([1.0, 3.0], [1.0, 1.0], [0.0, 0.0])
    assert got == pytest.approx(((1 + z) + 2 * z) / 2)


def test_ause_by_hand():
    # errors 4,3,2,1; K = 4 removes 0,1,2,3 crystals. Oracle MAE left: 2.5, 2, 1.5, 1.
    yt = np.zeros(4)
    yp = np.array([4.0, 3.0, 2.0, 1.0])
    # std anti-correlated with error: model drops 1, then 2, then 3: 2.5, 3, 3.5, 4
    bad = M.auc_sparsification_error(yp, [1.0, 2.0, 3.0, 4.0], yt, num_fractions=4)
    assert bad == pytest.approx(np.mean(np.array([0, 1.0, 2.0, 3.0]) / 2.5))
    good = M.auc_sparsification_error(yp, [4.0, 3.0, 2.0, 1.0], yt, num_fractions=4)
    assert good == pytest.approx(0.0)
    # constant std: model curve flat at 1, oracle 1, .8, .6, .4
    flat = M.auc_sparsification_error(yp, np.ones(4), yt, num_fractions=4)
    assert flat == pytest.approx(np.mean([0.0, 0.2, 0.4, 0.6]))


def test_sparsification_curves_unnormalised_in_ev():
    f, model, oracle = M.sparsification_curves(
        [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], np.zeros(4), num_fractions=4, normalise=False
    )
    np.testing.assert_allclose(f, [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(model, [2.5, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(oracle, [2.5, 2.0, 1.5, 1.0])


def test_perfect_predictions():
    out = M.evaluate(YT, YS, YT)
    assert out["mae"] == 0 and out["rmse"] == 0 and out["r2"] == 1.0
    assert math.isnan(out["spearman"])
    assert out["coverage_68"] == 1.0 and out["auc_sparsification_error"] == 0.0
    assert out["miscalibration_area"] == pytest.approx(0.5)


def test_evaluate_splits_nonmetals():
    yt = np.array([0.0, 0.0, 1.0, 2.0, 3.0])
    yp = np.array([0.5, 0.0, 1.5, 2.0, 2.0])
    ys = np.full(5, 0.5)
    out = M.evaluate(yp, ys, yt)
    assert out["n"] == 5 and out["nonmetal_n"] == 3
    assert out["mae"] == pytest.approx(2.0 / 5)
    assert out["nonmetal_mae"] == pytest.approx(1.5 / 3)
    assert set(out) == {*M.METRICS, *("nonmetal_" + k for k in M.METRICS), "n", "nonmetal_n"}
    custom = M.evaluate(yp, ys, yt, nonmetal_mask=np.array([1, 0, 0, 0, 0], dtype=bool))
    assert custom["nonmetal_mae"] == pytest.approx(0.5)
    all_metals = M.evaluate(yp, ys, np.zeros(5))
    assert all_metals["nonmetal_n"] == 0 and math.isnan(all_metals["nonmetal_mae"])
    with pytest.raises(ValueError, match="nonmetal_mask"):
        M.evaluate(yp, ys, yt, nonmetal_mask=[1, 0, 0, 0, 0])


@pytest.mark.parametrize("name", list(M.METRICS))
def test_every_metric_validates_inputs(name):
    fn = M.METRICS[name]
    with pytest.raises(ValueError, match="y_true"):
        fn([1.0, 2.0], [0.1, 0.1], [1.0])
    with pytest.raises(ValueError, match="y_std"):
        fn([1.0, 2.0], [0.1, -0.1], [1.0, 2.0])
    with pytest.raises(ValueError, match="y_pred"):
        fn([1.0, np.nan], [0.1, 0.1], [1.0, 2.0])
    with pytest.raises(ValueError, match="y_pred"):
        fn([], [], [])
    assert isinstance(fn([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [1.1, 2.5, 2.0]), float)


def test_bootstrap_intervals_hold_the_point_value_and_pair_models_on_the_same_resamples():
    from matbalora.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)
    y = np.where(rng.random(400) < 0.4, 0.0, rng.gamma(2.0, 1.0, 400))
    scale = rng.uniform(0.05, 1.0, 400)
    pred = np.clip(y + rng.normal(0, scale), 0, None)
    good = {"band_gap": pred, "std": scale, "lower": pred - 1.645 * scale, "upper": pred + 1.645 * scale}
    blind = good | {"std": rng.uniform(0.05, 1.0, 400)}  # the same gaps, a std that knows nothing
    table = bootstrap_intervals({"good": good, "same": dict(good), "blind": blind}, y, resamples=300)
    by = table.set_index(["model", "metric"])
    assert list(table["model"].unique()) == ["good", "same", "blind", "same - good", "blind - good"]
    assert np.all((table["low"] <= table["value"]) & (table["value"] <= table["high"]))
    assert by.loc[("good", "mae"), "value"] == pytest.approx(np.abs(pred - y).mean())
    assert by.loc[("good", "nonmetal_spearman"), "low"] > 0.3 > by.loc[("blind", "nonmetal_spearman"), "high"]
    # paired: an identical model differs by exactly 0 on every resample; the blind std is told apart
    assert (by.loc[("same - good", "spearman"), ["value", "low", "high"]] == 0).all()
    assert by.loc[("blind - good", "mae"), "value"] == 0 and by.loc[("blind - good", "spearman"), "high"] < 0
    with pytest.raises(ValueError, match=r"predictions\['bad'\]\['std'\]"):
        bootstrap_intervals({"bad": good | {"std": scale[:10]}}, y)
    with pytest.raises(ValueError, match="1 not finite"):
        bootstrap_intervals({"bad": good | {"band_gap": np.where(np.arange(400) == 7, np.nan, pred)}}, y)
