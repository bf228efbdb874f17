"""Prediction intervals and recalibration of predicted band-gap uncertainties.

Everything here works on flat arrays: ``y_pred`` (predicted gap, eV), ``y_std``
(predicted standard deviation, eV) and, when fitting, ``y_true`` (reference gap, eV).
Fit a recaliber on a validation split, never on the test split.

Band gaps are non-negative, so every interval returned here is the central interval of
the *rectified* prediction ``max(Y, 0)``: both bounds are clipped at 0 eV. Because
``max(., 0)`` is monotone, this is exactly the same as clipping the Gaussian bounds, and
for non-negative ``y_true`` it changes interval widths but never coverage, except that
an interval lying wholly below 0 becomes ``[0, 0]`` (which covers a metal).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from sklearn.isotonic import IsotonicRegression

__all__ = [
    "check_arrays",
    "check_level",
    "gaussian_interval",
    "StdScaler",
    "IsotonicRecalibrator",
    "ConformalIntervals",
    "fit_recalibration",
]


def check_arrays(
    y_pred: Any, y_std: Any, y_true: Any | None = None
) -> tuple[np.ndarray, ...]:
    """Return the inputs as flat float64 arrays after validating them.

    Checks: each is 1-D (or scalar-free flat), non-empty, equal length, finite, and
    ``y_std >= 0``. Raises ``ValueError`` naming the offending array. ``y_true`` may be
    omitted (for prediction-time calls); then a pair is returned.
    """
    named = {"y_pred": y_pred, "y_std": y_std}
    if y_true is not None:
        named["y_true"] = y_true
    out = []
    n = None
    for name, value in named.items():
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from exc
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name} must not be empty")
        if n is None:
            n = arr.size
        elif arr.size != n:
            raise ValueError(f"{name} has length {arr.size}, expected {n} (length of y_pred)")
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"{name} must be finite; {name}[{bad}] = {arr[bad]}")
        out.append(arr)
    if np.any(out[1] < 0):
        bad = int(np.flatnonzero(out[1] < 0)[0])
        raise ValueError(f"y_std must be >= 0; y_std[{bad}] = {out[1][bad]}")
    return tuple(out)


def check_level(level: float) -> float:
    """Validate a nominal coverage level; it must lie strictly between 0 and 1."""
    try:
        level = float(level)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}") from exc
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1) (e.g. 0.9 for 90%), got {level}")
    return level


def _clipped(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # np.maximum propagates NaN, so NaN inputs stay NaN bounds.
    return np.maximum(lower, 0.0), np.maximum(upper, 0.0)


def gaussian_interval(mean: Any, std: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval of N(mean, std^2), both bounds clipped at 0 eV.

    Args:
        mean: predicted gaps, eV, any shape.
        std: predicted standard deviations, eV, broadcastable to ``mean``; NaN gives NaN
            bounds (e.g. crystals that could not be predicted), negative raises.
        level: nominal coverage in (0, 1).
    Returns:
        ``(lower, upper)`` arrays, eV.
    """
    level = check_level(level)
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if np.any(std < 0):  # NaN compares False, so NaN passes through
        raise ValueError("std must be >= 0 (NaN allowed), got a negative value")
    z = stats.norm.ppf(0.5 + level / 2.0)
    return _clipped(mean - z * std, mean + z * std)


def _require_fitted(obj: Any, attr: str) -> None:
    if getattr(obj, attr) is None:
        raise RuntimeError(f"{type(obj).__name__} is not fitted; call .fit() first")


class StdScaler:
    """Recalibrate predicted stds, fitted on a validation split: ``std' = sqrt((k s)^2 + c^2)``.

    ``k`` scales the model's own (epistemic) spread; the optional floor ``c`` (eV) is a
    homoscedastic error term every prediction shares (BALORA.md's "total variance = epistemic +
    aleatoric", with the aleatoric part fitted after training instead of learned). Without a
    floor, the Gaussian NLL ``mean(log(k s) + err^2 / (2 k^2 s^2))`` is minimised in closed form by
    ``k^2 = mean((err / s)^2)``; that single factor is driven by the crystals whose spread is
    near zero but whose error is not, and so widens every interval. With ``floor=True`` both
    ``k`` and ``c`` minimise the validation NLL (L-BFGS on their logarithms). ``k > 1`` means the
    spread was over-confident. Scaling ``s`` by one factor keeps its ranking; a floor does not
    change the ranking either (``std'`` is increasing in ``s``).
    """

    def __init__(self, factor: float | None = None, floor: float = 0.0) -> None:
        if factor is not None and not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be finite and > 0, got {factor}")
        if not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be finite and >= 0 eV, got {floor}")
        self.factor = None if factor is None else float(factor)
        self.floor = float(floor)

    def fit(self, y_pred: Any, y_std: Any, y_true: Any, *, floor: bool = False) -> StdScaler:
        """Fit ``k`` (and, with ``floor=True``, ``c``) on validation arrays (eV).

        Without a floor every ``y_std`` must be > 0; with one, zeros are allowed (``c`` covers them).
        """
        y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
        err2 = (y_pred - y_true) ** 2
        if not np.any(err2 > 0):
            raise ValueError("y_pred equals y_true everywhere; the scale factor would be 0")
        if not floor:
            if np.any(y_std == 0):
                raise ValueError("y_std must be > 0 everywhere to fit StdScaler without a floor (found 0)")
            self.factor, self.floor = float(np.sqrt(np.mean(err2 / y_std**2))), 0.0
            return self
        self.factor, self.floor = _fit_scale_and_floor(y_std, err2)
        return self

    def transform(self, y_std: Any) -> np.ndarray:
        """Return ``sqrt((k y_std)^2 + c^2)`` (eV), same shape as ``y_std``; NaN stays NaN."""
        _require_fitted(self, "factor")
        return np.hypot(self.factor * np.asarray(y_std, dtype=np.float64), self.floor)

    def to_dict(self) -> dict[str, Any]:
        _require_fitted(self, "factor")
        return {"kind": "StdScaler", "factor": self.factor, "floor": self.floor}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StdScaler:
        if d.get("kind") != "StdScaler" or "factor" not in d:
            raise ValueError(f"not a StdScaler dict (need kind='StdScaler' and factor): {d!r}")
        return cls(factor=float(d["factor"]), floor=float(d.get("floor", 0.0)))

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any] | None) -> StdScaler:
        """The scaler stored in a model card's ``calibration`` (``std_scale``, ``std_floor``);
        identity for a card without one. Cards written before the floor existed load with ``c = 0``."""
        calibration = calibration or {}
        return cls(factor=float(calibration.get("std_scale", 1.0)), floor=float(calibration.get("std_floor", 0.0)))

    def __repr__(self) -> str:
        return f"StdScaler(factor={self.factor}, floor={self.floor})"


def _fit_scale_and_floor(y_std: np.ndarray, err2: np.ndarray) -> tuple[float, float]:
    """Minimise the mean Gaussian NLL of ``err`` under variance ``k^2 s^2 + c^2`` over (log k, log c)."""
    from scipy.optimize import minimize

    rms = float(np.sqrt(np.mean(err2)))
    s2 = y_std**2

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        k2, c2 = np.exp(2 * theta)
        var = k2 * s2 + c2
        ratio = err2 / var
        value = 0.5 * np.mean(np.log(var) + ratio)
        dvar = 0.5 * (1.0 - ratio) / var  # d nll_i / d var_i
        return float(value), np.array([np.mean(dvar * 2 * k2 * s2), np.mean(dvar * 2 * c2)])

    positive = y_std > 0
    k0 = float(np.sqrt(np.mean(err2[positive] / s2[positive]))) if positive.any() else 1.0
    best = None
    for start in ([math.log(max(k0, 1e-6)), math.log(rms * 1e-3)], [0.0, math.log(rms / 2)]):
        res = minimize(nll, np.array(start), jac=True, method="L-BFGS-B",
                       bounds=[(math.log(1e-6), math.log(1e8)), (math.log(rms * 1e-6), math.log(rms * 10))])
        if best is None or res.fun < best.fun:
            best = res
    k, c = np.exp(best.x)
    return float(k), float(c)


def _needed_level(y_pred: np.ndarray, y_std: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Smallest nominal Gaussian level whose central interval contains each y_true."""
    err = np.abs(y_true - y_pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(err == 0, 0.0, err / y_std)  # x/0 -> inf
    return 2.0 * stats.norm.cdf(r) - 1.0


class IsotonicRecalibrator:
    """Map a wanted coverage to the nominal Gaussian level that achieves it.

    Kuleshov et al. (2018) recalibration, applied to centred intervals as in
    uncertainty-toolbox: on a validation split, each crystal needs the nominal level
    ``u_i = 2 Phi(|err_i| / std_i) - 1`` to be covered, so the observed coverage at
    nominal level ``p`` is the empirical CDF of ``u``. An isotonic regression of nominal
    level on observed coverage inverts that curve.
    """

    def __init__(self) -> None:
        self.model: IsotonicRegression | None = None

    def fit(self, y_pred: Any, y_std: Any, y_true: Any) -> IsotonicRecalibrator:
        y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
        u = np.sort(_needed_level(y_pred, y_std, y_true))
        observed = np.arange(1, u.size + 1) / u.size
        x = np.concatenate([[0.0], observed])
        y = np.concatenate([[0.0], u])
        self.model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        self.model.fit(x, y)
        return self

    def nominal_level(self, level: float) -> float:
        """Nominal Gaussian level to use so that the observed coverage is ``level``."""
        _require_fitted(self, "model")
        level = check_level(level)
        return float(self.model.predict([level])[0])

    def interval(self, y_pred: Any, y_std: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Recalibrated central interval ``(lower, upper)``, eV, clipped at 0."""
        p = self.nominal_level(level)
        y_pred, y_std = check_arrays(y_pred, y_std)
        if p >= 1.0:
            return np.zeros_like(y_pred), np.full_like(y_pred, np.inf)
        if p <= 0.0:
            return _clipped(y_pred, y_pred.copy())
        return gaussian_interval(y_pred, y_std, p)


class ConformalIntervals:
    """Normalised split-conformal intervals ``y_pred +- q * y_std``.

    Score ``s_i = |err_i| / std_i`` on a calibration split of size n; ``q`` is the
    ``ceil((n + 1) * level)``-th smallest score (the finite-sample correction that
    guarantees marginal coverage >= level for exchangeable data). If that rank exceeds n,
    ``q = inf`` and intervals are ``[0, inf)``: the split is too small for the level.
    A calibration crystal with std 0 scores 0 if its error is 0, else inf.
    """

    def __init__(self) -> None:
        self.q: float | None = None
        self.level: float | None = None

    def fit(self, y_pred: Any, y_std: Any, y_true: Any, level: float) -> ConformalIntervals:
        level = check_level(level)
        y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
        err = np.abs(y_true - y_pred)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.sort(np.where(err == 0, 0.0, err / y_std))
        n = scores.size
        k = math.ceil((n + 1) * level)
        self.q = float(scores[k - 1]) if k <= n else math.inf
        self.level = level
        return self

    def interval(self, y_pred: Any, y_std: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(lower, upper)``, eV, lower (and an all-negative upper) clipped at 0."""
        _require_fitted(self, "q")
        y_pred, y_std = check_arrays(y_pred, y_std)
        with np.errstate(invalid="ignore"):
            half = self.q * y_std  # inf * 0 -> NaN, reset below
        half[y_std == 0] = 0.0
        return _clipped(y_pred - half, y_pred + half)

    def to_dict(self) -> dict[str, Any]:
        _require_fitted(self, "q")
        return {"kind": "ConformalIntervals", "q": self.q, "level": self.level}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalIntervals:
        if d.get("kind") != "ConformalIntervals" or "q" not in d or "level" not in d:
            raise ValueError(f"not a ConformalIntervals dict (need kind, q, level): {d!r}")
        obj = cls()
        obj.q = float(d["q"])
        obj.level = check_level(d["level"])
        return obj


def fit_recalibration(y_pred: Any, y_std: Any, y_true: Any, *, level: float = 0.9) -> dict[str, Any]:
    """The ``calibration`` block of a model card, fitted on validation arrays (eV).

    ``std_scale`` and ``std_floor`` are the :class:`StdScaler` fitted with a floor (prediction time
    reads them back with :meth:`StdScaler.from_calibration`); ``conformal`` is the split-conformal
    quantile at ``level`` of the errors normalised by the *recalibrated* std.
    """
    scaler = StdScaler().fit(y_pred, y_std, y_true, floor=True)
    conformal = ConformalIntervals().fit(y_pred, scaler.transform(y_std), y_true, level)
    return {"std_scale": scaler.factor, "std_floor": scaler.floor, "conformal": conformal.to_dict() | {"std": "recalibrated"}}
