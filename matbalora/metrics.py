"""Accuracy and uncertainty metrics for band-gap predictions.

Every metric is a pure numpy function ``(y_pred, y_std, y_true) -> float`` on flat arrays
of equal length: predicted gap (eV), predicted standard deviation (eV, >= 0) and
reference gap (eV). Inputs are validated by :func:`matbalora.calibration.check_arrays`
(non-empty, equal length, finite, ``y_std >= 0``; ``ValueError`` names the bad array).
Tuning knobs are keyword-only with defaults, so the three-array call always works.

:func:`evaluate` returns every metric in :data:`METRICS` on all crystals and, prefixed
``nonmetal_``, on crystals with ``y_true > 0``: about 44% of Materials Project gaps are
exactly 0 eV and otherwise dominate the rank and calibration metrics.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy import stats

from matbalora.calibration import check_arrays, check_level, gaussian_interval

Metric = Callable[[Any, Any, Any], float]

#: Floor on the std inside :func:`nll`, eV. A model claiming sub-meV certainty is scored
#: as if it claimed 1 meV, so one exact-zero std cannot make the NLL infinite.
NLL_STD_FLOOR = 1e-3


def mae(y_pred: Any, y_std: Any, y_true: Any) -> float:
    """Mean absolute error, eV. ``y_std`` is validated but unused."""
    y_pred, _, y_true = check_arrays(y_pred, y_std, y_true)
    return float(np.mean(np.abs(y_pred - y_true)))


def rmse(y_pred: Any, y_std: Any, y_true: Any) -> float:
    """Root mean squared error, eV. ``y_std`` is validated but unused."""
    y_pred, _, y_true = check_arrays(y_pred, y_std, y_true)
    return float(np.sqrt(np.mean((y_pred - y_true) ** 2)))


def r2(y_pred: Any, y_std: Any, y_true: Any) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``; NaN when y_true is constant."""
    y_pred, _, y_true = check_arrays(y_pred, y_std, y_true)
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0:
        return math.nan
    return 1.0 - float(np.sum((y_true - y_pred) ** 2)) / ss_tot


def spearman(y_pred: Any, y_std: Any, y_true: Any) -> float:
    """Spearman rank correlation between ``|y_pred - y_true|`` and ``y_std``.

    Returns NaN (without a warning) when either ranking is undefined: fewer than two
    crystals, all stds equal, or all absolute errors equal. Ties get average ranks.
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    err = np.abs(y_pred - y_true)
    if err.size < 2 or np.all(y_std == y_std[0]) or np.all(err == err[0]):
        return math.nan
    return float(stats.spearmanr(err, y_std).statistic)


def nll(y_pred: Any, y_std: Any, y_true: Any, *, std_floor: float = NLL_STD_FLOOR) -> float:
    """Mean Gaussian negative log-likelihood (nats per crystal).

    ``0.5 * log(2 pi s^2) + (y_true - y_pred)^2 / (2 s^2)`` with
    ``s = max(y_std, std_floor)``; ``std_floor`` is in eV (see :data:`NLL_STD_FLOOR`).
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    if not std_floor > 0:
        raise ValueError(f"std_floor must be > 0 eV, got {std_floor}")
    var = np.maximum(y_std, std_floor) ** 2
    return float(np.mean(0.5 * np.log(2 * np.pi * var) + (y_true - y_pred) ** 2 / (2 * var)))


def _normalised_abs_residuals(y_pred, y_std, y_true) -> np.ndarray:
    """``|err| / std`` with 0/0 -> 0 and x/0 -> inf."""
    err = np.abs(y_pred - y_true)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(err == 0, 0.0, err / y_std)


def interval_proportions(
    y_pred: Any, y_std: Any, y_true: Any, *, num_bins: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed proportion of y_true inside centred Gaussian intervals.

    ``expected = linspace(0, 1, num_bins)``; ``observed[j]`` is the fraction of crystals
    with ``|y_pred - y_true| <= z_j * y_std``, ``z_j = Phi^-1(0.5 + expected[j] / 2)``
    (uncertainty-toolbox ``get_proportion_lists_vectorized``, ``prop_type="interval"``).
    Intervals are not clipped at 0 here; for y_true >= 0 clipping would not change them.
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    expected = np.linspace(0.0, 1.0, num_bins)
    z = stats.norm.ppf(0.5 + expected / 2.0)  # z[0] = 0, z[-1] = inf
    r = np.sort(_normalised_abs_residuals(y_pred, y_std, y_true))
    observed = np.searchsorted(r, z, side="right") / r.size
    return expected, observed


def _area_between(x: np.ndarray, d: np.ndarray) -> float:
    """Exact integral of |d| for d piecewise linear between the points (x, d)."""
    dx = np.diff(x)
    a, b = d[:-1], d[1:]
    same_sign = a * b >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (a * a + b * b) / (np.abs(a) + np.abs(b))
    seg = np.where(same_sign, np.abs(a + b), crossing) * dx / 2.0
    return float(np.sum(seg))


def miscalibration_area(y_pred: Any, y_std: Any, y_true: Any, *, num_bins: int = 100) -> float:
    """Area between the observed-vs-expected proportion curve and the diagonal.

    As uncertainty-toolbox ``miscalibration_area`` (``prop_type="interval"``): the
    curve from :func:`interval_proportions` on ``num_bins`` expected proportions
    ``linspace(0, 1, num_bins)``, joined by straight lines; the area is the exact
    integral of ``|observed - expected|`` over [0, 1] (uncertainty-toolbox obtains the
    same number by polygonising the region with shapely). 0 is perfect; 0.5 is the worst.
    """
    expected, observed = interval_proportions(y_pred, y_std, y_true, num_bins=num_bins)
    return _area_between(expected, observed - expected)


def ence(y_pred: Any, y_std: Any, y_true: Any, *, num_bins: int = 10) -> float:
    """Expected normalised calibration error (Levi et al. 2019).

    Crystals are sorted by ``y_std`` (stable sort) and split into ``min(num_bins, n)``
    bins of (near) equal count; ``ENCE = mean_j |RMV_j - RMSE_j| / RMV_j`` with
    ``RMV_j = sqrt(mean(std^2))`` and ``RMSE_j`` the RMSE in bin j. A bin with
    ``RMV = 0`` contributes 0 if its RMSE is 0, else inf. Dimensionless.
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    order = np.argsort(y_std, kind="stable")
    terms = []
    for idx in np.array_split(order, min(num_bins, order.size)):
        rmv = math.sqrt(np.mean(y_std[idx] ** 2))
        rmse_bin = math.sqrt(np.mean((y_pred[idx] - y_true[idx]) ** 2))
        if rmv == 0:
            terms.append(0.0 if rmse_bin == 0 else math.inf)
        else:
            terms.append(abs(rmv - rmse_bin) / rmv)
    return float(np.mean(terms))


#: The 1-sigma level, erf(1/sqrt 2) = 0.6827, used by :func:`coverage_68`.
ONE_SIGMA_LEVEL = math.erf(1 / math.sqrt(2))


def coverage(level: float) -> Metric:
    """Make a metric: fraction of y_true inside the central ``level`` Gaussian interval.

    Intervals are ``mean +- z * std`` (``z = Phi^-1(0.5 + level / 2)``) with both bounds
    clipped at 0 eV (:func:`matbalora.calibration.gaussian_interval`), bounds inclusive.
    For y_true >= 0 clipping changes the answer only when the whole interval is below 0
    (it becomes [0, 0] and covers a 0 eV metal).
    """
    level = check_level(level)

    def _coverage(y_pred: Any, y_std: Any, y_true: Any) -> float:
        y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
        lower, upper = gaussian_interval(y_pred, y_std, level)
        return float(np.mean((y_true >= lower) & (y_true <= upper)))

    _coverage.__name__ = f"coverage_{round(100 * level)}"
    _coverage.__doc__ = f"Fraction of y_true inside the central {level:.4g} interval."
    return _coverage


coverage_68 = coverage(ONE_SIGMA_LEVEL)  # +-1 std
coverage_90 = coverage(0.90)
coverage_95 = coverage(0.95)


def mean_interval_width_90(y_pred: Any, y_std: Any, y_true: Any) -> float:
    """Mean width (eV) of the central 90% interval after clipping both bounds at 0 eV."""
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    lower, upper = gaussian_interval(y_pred, y_std, 0.90)
    return float(np.mean(upper - lower))


def _mean_of_kept(err_sorted: np.ndarray, num_fractions: int) -> tuple[np.ndarray, np.ndarray]:
    """MAE of what is left after dropping the first ``floor(i n / K)`` entries."""
    n = err_sorted.size
    fractions = np.arange(num_fractions) / num_fractions
    removed = (np.arange(num_fractions) * n) // num_fractions
    tail_sums = np.concatenate([np.cumsum(err_sorted[::-1])[::-1], [0.0]])
    return fractions, tail_sums[removed] / (n - removed)


def sparsification_curves(
    y_pred: Any, y_std: Any, y_true: Any, *, num_fractions: int = 100, normalise: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparsification curves: MAE of the crystals left after removing the most uncertain.

    For fractions ``f_i = i / K``, ``i = 0..K-1`` (``K = num_fractions``), the
    ``floor(i n / K)`` crystals with the largest ``y_std`` are removed (model curve) or
    with the largest absolute error (oracle curve) and the MAE of the rest is recorded.
    Crystals with tied std are removed in expectation over random tie order (their
    errors are averaged), so a constant std gives a flat model curve. With
    ``normalise`` both curves are divided by the MAE of all crystals (Ilg et al. 2018),
    so they start at 1; otherwise they are in eV.

    Returns:
        ``(fractions, model, oracle)``, each ``[K]``.
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    if num_fractions < 1:
        raise ValueError(f"num_fractions must be >= 1, got {num_fractions}")
    err = np.abs(y_pred - y_true)
    groups, inverse = np.unique(-y_std, return_inverse=True)  # sorted: largest std first
    group_mean = np.bincount(inverse, weights=err) / np.bincount(inverse)
    by_std = group_mean[inverse][np.argsort(inverse, kind="stable")]
    fractions, model = _mean_of_kept(by_std, num_fractions)
    _, oracle = _mean_of_kept(np.sort(err)[::-1], num_fractions)
    if normalise:
        total = err.mean()
        if total == 0:
            return fractions, np.ones_like(model), np.ones_like(oracle)
        model, oracle = model / total, oracle / total
    return fractions, model, oracle


def auc_sparsification_error(
    y_pred: Any, y_std: Any, y_true: Any, *, num_fractions: int = 100
) -> float:
    """Area under the sparsification error curve (AUSE, Ilg et al. 2018).

    ``AUSE = (1/K) sum_i [model(f_i) - oracle(f_i)]`` over the normalised curves of
    :func:`sparsification_curves` (a left Riemann sum of the area over fractions [0, 1)).
    0 means the stds rank errors like the oracle; larger is worse. Perfect predictions
    (MAE 0) give 0. Dimensionless.
    """
    _, model, oracle = sparsification_curves(
        y_pred, y_std, y_true, num_fractions=num_fractions, normalise=True
    )
    return float(np.mean(model - oracle))


#: Metric name -> function, in the order :func:`evaluate` reports them.
METRICS: dict[str, Metric] = {
    "mae": mae,
    "rmse": rmse,
    "r2": r2,
    "spearman": spearman,
    "nll": nll,
    "miscalibration_area": miscalibration_area,
    "ence": ence,
    "coverage_68": coverage_68,
    "coverage_90": coverage_90,
    "coverage_95": coverage_95,
    "mean_interval_width_90": mean_interval_width_90,
    "auc_sparsification_error": auc_sparsification_error,
}


def evaluate(
    y_pred: Any, y_std: Any, y_true: Any, *, nonmetal_mask: Any | None = None
) -> dict[str, float]:
    """All :data:`METRICS` on all crystals, and prefixed ``nonmetal_`` on the non-metals.

    Args:
        y_pred, y_std, y_true: ``[n]`` arrays, eV.
        nonmetal_mask: ``[n]`` bool; defaults to ``y_true > 0``.
    Returns:
        ``{name: value, ..., "nonmetal_" + name: value, ..., "n": n, "nonmetal_n": m}``;
        the counts are ints, the nonmetal metrics are NaN when there are no non-metals.
    """
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    if nonmetal_mask is None:
        mask = y_true > 0
    else:
        mask = np.asarray(nonmetal_mask)
        if mask.dtype != bool or mask.shape != y_true.shape:
            raise ValueError(
                f"nonmetal_mask must be a bool array of shape {y_true.shape}, "
                f"got dtype {mask.dtype} shape {mask.shape}"
            )
    out: dict[str, float] = {name: fn(y_pred, y_std, y_true) for name, fn in METRICS.items()}
    sub = (y_pred[mask], y_std[mask], y_true[mask])
    for name, fn in METRICS.items():
        out["nonmetal_" + name] = fn(*sub) if mask.any() else math.nan
    out["n"] = int(y_true.size)
    out["nonmetal_n"] = int(mask.sum())
    return out


#: what :func:`bootstrap_intervals` reports of each model
HEADLINE = ("mae", "spearman", "nonmetal_spearman", "coverage")


def interval_coverage(lower: Any, upper: Any, y_true: Any) -> float:
    """Share of ``y_true`` inside ``[lower, upper]`` (any intervals: conformal, clipped, Gaussian)."""
    lower, upper, y_true = (np.asarray(a, dtype=float) for a in (lower, upper, y_true))
    return float(np.mean((y_true >= lower) & (y_true <= upper)))


def _headline(pred: np.ndarray, std: np.ndarray, lower: np.ndarray, upper: np.ndarray, y: np.ndarray) -> np.ndarray:
    nm = y > 0
    return np.array([mae(pred, std, y), spearman(pred, std, y), spearman(pred[nm], std[nm], y[nm]) if nm.sum() >= 2 else math.nan,
                     interval_coverage(lower, upper, y)])


def bootstrap_intervals(predictions: dict[str, Any], y_true: Any, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """How sure a test set's headline numbers are: percentile bootstrap intervals over its crystals.

    Args:
        predictions: model name -> a mapping (a prediction DataFrame will do) with ``band_gap``,
            ``std``, ``lower`` and ``upper`` arrays ``[n]`` (eV) of the same crystals as ``y_true``.
        y_true: ``[n]`` reference gaps, eV.
    Returns:
        A DataFrame, one row per model and :data:`HEADLINE` metric (MAE, Spearman(|error|, std) on
        all crystals and on non-metals, coverage of ``[lower, upper]``): ``value`` and the interval
        ``low`` / ``high``; then, for every model after the first, its difference from the first
        (``model`` = ``"<name> - <first>"``) on the same resamples (paired: a resample keeps each
        crystal's predictions by every model together). A difference whose interval holds 0 is
        one this test set cannot tell apart. ``scipy.stats.bootstrap``, ``method="percentile"``.
    """
    import pandas as pd

    y = np.asarray(y_true, dtype=float)
    names = list(predictions)
    if not names:
        raise ValueError("predictions: no models given")
    cols = {}
    for name in names:
        arrays = [np.asarray(predictions[name][c], dtype=float) for c in ("band_gap", "std", "lower", "upper")]
        for c, a in zip(("band_gap", "std", "lower", "upper"), arrays):
            if a.shape != y.shape or not np.all(np.isfinite(a)):
                raise ValueError(f"predictions[{name!r}][{c!r}]: must be {y.shape} finite values, got shape {a.shape}"
                                 f"{'' if a.shape != y.shape else f' with {int(np.sum(~np.isfinite(a)))} not finite (drop the rows whose prediction failed: their error column)'}")
        cols[name] = arrays
    if not 0 < confidence < 1 or resamples < 2:
        raise ValueError(f"confidence={confidence} must lie in (0, 1) and resamples={resamples} be >= 2")
    k = len(HEADLINE)

    def statistic(i: np.ndarray) -> np.ndarray:  # the models' values, then their differences from the first
        i = i.astype(int)
        values = [_headline(*(a[i] for a in cols[n]), y[i]) for n in names]
        return np.concatenate([*values, *(v - values[0] for v in values[1:])])

    index = np.arange(y.size)
    res = stats.bootstrap((index,), statistic, vectorized=False, n_resamples=resamples, method="percentile",
                          confidence_level=confidence, random_state=np.random.default_rng(seed))
    point, (low, high) = statistic(index), res.confidence_interval
    labels = [*names, *(f"{n} - {names[0]}" for n in names[1:])]
    rows = [{"model": label, "metric": m, "value": point[r * k + j], "low": low[r * k + j], "high": high[r * k + j]}
            for r, label in enumerate(labels) for j, m in enumerate(HEADLINE)]
    return pd.DataFrame(rows, columns=["model", "metric", "value", "low", "high"])
