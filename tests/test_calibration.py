"""Tests for matbalora.calibration: intervals and recalibration on synthetic Gaussian data."""

import math

import numpy as np
import pytest

from matbalora.calibration import (
    ConformalIntervals,
    IsotonicRecalibrator,
    StdScaler,
    check_arrays,
    gaussian_interval,
)

N = 20000


def _split(seed: int, scale: float):
    """Heteroscedastic Gaussian data, gaps well above 0; reported std = scale * true std."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.1, 0.5, N)
    y_pred = rng.uniform(2.0, 6.0, N)
    y_true = y_pred + sigma * rng.normal(size=N)
    return y_pred, scale * sigma, y_true


def _coverage(lower, upper, y_true):
    return float(np.mean((y_true >= lower) & (y_true <= upper)))


def _tol(level: float) -> float:
    """3 sigma of (held-out - fitted) coverage for two splits of N: 0.0085 at 90%, 0.015 at 50%."""
    return max(0.01, 3 * math.sqrt(2 * level * (1 - level) / N))


def test_gaussian_interval_by_hand():
    z90 = 1.6448536269514722
    lo, hi = gaussian_interval([3.0, 0.5, np.nan, 1.0], [1.0, 1.0, 0.2, np.nan], 0.9)
    np.testing.assert_allclose(lo[:2], [3 - z90, 0.0])  # second one clipped at 0
    np.testing.assert_allclose(hi[:2], [3 + z90, 0.5 + z90])
    assert np.isnan(lo[2:]).all() and np.isnan(hi[2:]).all()
    lo, hi = gaussian_interval(-5.0, 1.0, 0.9)  # wholly negative -> [0, 0]
    assert lo == 0.0 and hi == 0.0
    with pytest.raises(ValueError, match="level"):
        gaussian_interval(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_interval(1.0, -1.0, 0.9)


def test_check_arrays_names_bad_input():
    with pytest.raises(ValueError, match="y_std"):
        check_arrays([1.0], [np.inf], [1.0])
    with pytest.raises(ValueError, match="y_true.*1-D"):
        check_arrays([1.0], [1.0], [[1.0]])


def test_std_scaler_closed_form_by_hand():
    # err/std = 1, 2 -> k^2 = (1 + 4) / 2
    k = StdScaler().fit([1.0, 2.0], [1.0, 0.5], [0.0, 3.0]).factor
    assert k == pytest.approx(math.sqrt(2.5))


def test_std_scaler_minimises_nll():
    yp, ys, yt = _split(1, 0.5)
    k = StdScaler().fit(yp, ys, yt).factor

    def nll(c):
        s = c * ys
        return np.mean(np.log(s) + (yt - yp) ** 2 / (2 * s**2))

    assert nll(k) < nll(k * 1.01) and nll(k) < nll(k * 0.99)
    assert k == pytest.approx(2.0, abs=0.03)


def test_std_scaler_restores_coverage_on_held_out_split():
    fit_split, test_split = _split(1, 0.5), _split(2, 0.5)
    yp, ys, yt = test_split
    before = _coverage(*gaussian_interval(yp, ys, 0.9), yt)
    assert before < 0.65  # P(|Z| < 0.82) ~ 0.59
    scaler = StdScaler().fit(*fit_split)
    after = _coverage(*gaussian_interval(yp, scaler.transform(ys), 0.9), yt)
    assert after == pytest.approx(0.9, abs=_tol(0.9))


def test_std_scaler_round_trip_and_errors():
    s = StdScaler().fit([1.0, 2.0], [1.0, 0.5], [0.0, 3.0])
    s2 = StdScaler.from_dict(s.to_dict())
    np.testing.assert_allclose(s2.transform([1.0, 2.0]), s.transform([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="fit"):
        StdScaler().transform([1.0])
    with pytest.raises(ValueError, match="y_std"):
        StdScaler().fit([1.0], [0.0], [2.0])
    with pytest.raises(ValueError, match="StdScaler"):
        StdScaler.from_dict({"kind": "ConformalIntervals", "q": 1.0})
    with pytest.raises(ValueError, match="factor"):
        StdScaler(factor=-1.0)


def _floored_split(seed: int):
    """Errors with variance (2 s)^2 + 0.3^2: a spread that is right in shape but too small, and a
    shared error term the spread knows nothing about (a quarter of the crystals have s ~ 0)."""
    rng = np.random.default_rng(seed)
    s = np.where(rng.random(N) < 0.25, 1e-4, rng.uniform(0.05, 0.5, N))
    y_pred = rng.uniform(2.0, 6.0, N)
    y_true = y_pred + np.sqrt((2 * s) ** 2 + 0.3**2) * rng.normal(size=N)
    return y_pred, s, y_true


def test_std_scaler_floor_recovers_scale_and_floor():
    scaler = StdScaler().fit(*_floored_split(1), floor=True)
    assert scaler.factor == pytest.approx(2.0, rel=0.05)
    assert scaler.floor == pytest.approx(0.3, rel=0.05)


def test_std_scaler_floor_beats_single_factor_on_held_out_split():
    fit_split, (yp, ys, yt) = _floored_split(1), _floored_split(2)
    floored, single = StdScaler().fit(*fit_split, floor=True), StdScaler().fit(*fit_split)
    assert single.factor > 100  # driven by the near-zero spreads: every interval becomes huge

    def nll(std):
        return np.mean(np.log(std) + (yt - yp) ** 2 / (2 * std**2))

    assert nll(floored.transform(ys)) < nll(single.transform(ys)) - 1.0
    lo, hi = gaussian_interval(yp, floored.transform(ys), 0.9)
    assert _coverage(lo, hi, yt) == pytest.approx(0.9, abs=_tol(0.9))
    assert np.median(hi - lo) < 0.1 * np.median(np.diff(gaussian_interval(yp, single.transform(ys), 0.9), axis=0))


def test_std_scaler_floor_allows_zero_spread_and_keeps_ranking():
    scaler = StdScaler().fit([1.0, 2.0, 3.0], [0.0, 0.5, 1.0], [1.5, 2.0, 1.0], floor=True)
    out = scaler.transform([0.0, 0.1, 1.0])
    assert out[0] == pytest.approx(scaler.floor) and out[0] < out[1] < out[2]


def test_std_scaler_reads_cards_written_before_the_floor():
    old = StdScaler.from_dict({"kind": "StdScaler", "factor": 3.0})
    assert old.floor == 0.0 and old.transform([2.0])[0] == pytest.approx(6.0)
    assert StdScaler.from_calibration({"std_scale": 2.0}).transform([1.0])[0] == pytest.approx(2.0)
    assert StdScaler.from_calibration(None).transform([0.7])[0] == pytest.approx(0.7)
    card = StdScaler.from_calibration({"std_scale": 2.0, "std_floor": 1.5})
    assert card.transform([2.0])[0] == pytest.approx(math.hypot(4.0, 1.5))
    with pytest.raises(ValueError, match="floor"):
        StdScaler(factor=1.0, floor=-0.1)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_isotonic_recalibration_restores_coverage(scale):
    yp, ys, yt = _split(4, scale)
    rec = IsotonicRecalibrator().fit(*_split(3, scale))
    for level in (0.5, 0.9):
        before = _coverage(*gaussian_interval(yp, ys, level), yt)
        assert abs(before - level) > 0.09  # e.g. 0.999 for a nominal 90% when 2x too wide
        after = _coverage(*rec.interval(yp, ys, level), yt)
        assert after == pytest.approx(level, abs=_tol(level))


def test_isotonic_nominal_level_monotone():
    rec = IsotonicRecalibrator().fit(*_split(3, 0.5))
    levels = [rec.nominal_level(p) for p in (0.1, 0.5, 0.9, 0.99)]
    assert levels == sorted(levels)
    assert levels[2] > 0.99  # over-confident stds need a much wider nominal level


def test_conformal_quantile_by_hand():
    # scores 1..5; level 0.5 -> rank ceil(6 * 0.5) = 3 -> q = 3
    yp = np.zeros(5)
    yt = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    c = ConformalIntervals().fit(yp, np.ones(5), yt, 0.5)
    assert c.q == 3.0
    lo, hi = c.interval([10.0, 1.0, 5.0], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(lo, [7.0, 0.0, 5.0])
    np.testing.assert_allclose(hi, [13.0, 4.0, 5.0])
    # level 0.9 -> rank ceil(5.4) = 6 > n: no finite quantile
    c = ConformalIntervals().fit(yp, np.ones(5), yt, 0.9)
    assert c.q == math.inf
    lo, hi = c.interval([1.0], [1.0])
    assert lo[0] == 0.0 and hi[0] == math.inf
    assert ConformalIntervals.from_dict(c.to_dict()).q == math.inf


def test_conformal_restores_coverage_on_held_out_split():
    yp, ys, yt = _split(6, 0.5)
    for level in (0.68, 0.9, 0.95):
        c = ConformalIntervals().fit(*_split(5, 0.5), level)
        before = _coverage(*gaussian_interval(yp, ys, level), yt)
        after = _coverage(*c.interval(yp, ys), yt)
        assert abs(before - level) > 0.1
        assert after == pytest.approx(level, abs=_tol(level))


def test_conformal_errors():
    with pytest.raises(RuntimeError, match="fit"):
        ConformalIntervals().interval([1.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        ConformalIntervals().fit([1.0], [1.0], [1.0], 90)
    with pytest.raises(ValueError, match="y_true"):
        ConformalIntervals().fit([1.0, 2.0], [1.0, 1.0], [1.0], 0.9)
