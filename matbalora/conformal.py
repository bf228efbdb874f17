"""Class-conditional (Mondrian) conformal intervals, fitted on the validation split with crepes.

Each crystal falls in one class that is known at prediction time (never the true gap): ``metal``
when ``p_metal >= metal_p``, otherwise the range of its predicted gap, ``0-1``, ``1-3`` or ``>3`` eV
(``gap_edges``). The score of a validation crystal is ``|y - band_gap| / std`` with the recalibrated
std; crepes' normalised Mondrian ``ConformalRegressor`` turns the scores of each class into the
interval ``band_gap +- q_c std`` at any level, ``q_c`` the ``ceil((n_c + 1) level)``-th smallest
score of class ``c``, so that each class is covered at ``level`` (for exchangeable crystals), not
only all of them together. The lower bound is clipped at 0 eV. A class with fewer than
``MIN_CLASS`` validation crystals uses the scores of all of them (marginal coverage; listed in
``pooled``). A level too high for a class's size gives ``[0, inf)``.

The card stores each class's sorted scores as plain JSON numbers (rounded up to 1e-6), so that
any level can be asked for at prediction time; never a pickle.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from matbalora.calibration import check_arrays, check_level
from matbalora.defaults import METAL_THRESHOLD

log = logging.getLogger(__name__)

__all__ = ["MIN_CLASS", "MondrianIntervals"]

#: Validation crystals a class needs to be calibrated on its own.
MIN_CLASS = 20
#: Largest score stored (a crystal with std 0 and a non-zero error scores inf).
MAX_SCORE = 1e8
KIND = "MondrianConformal"


class MondrianIntervals:
    """Per-class normalised conformal intervals; ``scores[c]`` are the validation scores of class ``c``."""

    def __init__(self, scores: list, *, metal_p: float = 0.5, gap_edges: tuple[float, ...] = (1.0, 3.0),
                 metal_threshold: float = METAL_THRESHOLD, pooled: tuple[str, ...] = ()) -> None:
        edges = [float(e) for e in gap_edges]
        if not edges or any(not a < b for a, b in zip([0.0, *edges], edges)) or not math.isfinite(edges[-1]):
            raise ValueError(f"gap_edges={gap_edges!r} must be finite, > 0 and increasing (eV)")
        if not 0 < metal_p <= 1:
            raise ValueError(f"metal_p={metal_p!r} must be in (0, 1]")
        self.metal_p, self.gap_edges, self.metal_threshold = float(metal_p), tuple(edges), float(metal_threshold)
        if len(scores) != len(self.classes):
            raise ValueError(f"scores lists {len(scores)} classes, expected {len(self.classes)} ({self.classes})")
        self.scores = [np.sort(np.asarray(s, dtype=np.float64)) for s in scores]
        if any(s.size == 0 or not np.all((s >= 0) & np.isfinite(s)) for s in self.scores):
            raise ValueError("every class needs at least one finite score >= 0")
        self.pooled = tuple(pooled)

    @property
    def classes(self) -> list[str]:
        """Class names: ``metal``, then one per predicted-gap range, e.g. ``0-1``, ``1-3``, ``>3``."""
        lows = [0.0, *self.gap_edges]
        return ["metal"] + [f"{a:g}-{b:g}" for a, b in zip(lows, self.gap_edges)] + [f">{self.gap_edges[-1]:g}"]

    def classify(self, band_gap: Any, p_metal: Any) -> np.ndarray:
        """``[n]`` class index of each crystal from its predicted gap and ``p_metal``; -1 where either is NaN."""
        band_gap, p_metal = np.asarray(band_gap, dtype=np.float64), np.asarray(p_metal, dtype=np.float64)
        index = np.where(p_metal >= self.metal_p, 0, 1 + np.searchsorted(self.gap_edges, band_gap, side="right"))
        index[np.isnan(band_gap) | np.isnan(p_metal)] = -1
        return index

    @classmethod
    def fit(cls, band_gap: Any, std: Any, p_metal: Any, y_true: Any, *, min_class: int = MIN_CLASS, **kwargs: Any) -> MondrianIntervals:
        """Fit on validation arrays (eV; ``std`` recalibrated, ``p_metal`` from :mod:`matbalora.probabilities`)."""
        band_gap, std, y_true = check_arrays(band_gap, std, y_true)
        probe = cls([[0.0]] * (len(kwargs.get("gap_edges", (1.0, 3.0))) + 2), **kwargs)
        index = probe.classify(band_gap, p_metal)
        if np.any(index < 0):
            raise ValueError("p_metal must be finite for every validation crystal")
        err = np.abs(y_true - band_gap)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.minimum(np.where(err == 0, 0.0, err / std), MAX_SCORE)
        score = np.ceil(score * 1e6) / 1e6  # stored rounded up: an interval never narrows by rounding
        scores, pooled = [], []
        for c, name in enumerate(probe.classes):
            own = score[index == c]
            if own.size < min_class:
                own, pooled = score, [*pooled, name]
            scores.append(own)
        return cls(scores, pooled=tuple(pooled), **kwargs)

    def interval(self, band_gap: Any, std: Any, p_metal: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` eV of each crystal at ``level`` (crepes ``predict_int`` on the stored scores);
        NaN where ``band_gap``, ``std`` or ``p_metal`` is NaN."""
        from crepes import ConformalRegressor

        level = check_level(level)
        band_gap, std = np.asarray(band_gap, dtype=np.float64), np.asarray(std, dtype=np.float64)
        index = self.classify(band_gap, p_metal)
        lower, upper = np.full(band_gap.shape, np.nan), np.full(band_gap.shape, np.nan)
        ok = (index >= 0) & np.isfinite(std)
        if not ok.any():
            return lower, upper
        labels = np.concatenate([np.full(s.size, c) for c, s in enumerate(self.scores)])
        scores = np.concatenate(self.scores)
        regressor = ConformalRegressor().fit(scores, sigmas=np.ones_like(scores), bins=labels)  # normalised Mondrian, residuals = scores
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # crepes takes rank int((1 - level)(n + 1)) from the top; 1 - 0.8 = 0.19999999999999996 would cost
            # one rank where (n + 1) level is a whole number, so the level is nudged down by 1e-12
            bounds = regressor.predict_int(band_gap[ok], sigmas=std[ok], bins=index[ok], confidence=level - 1e-12, y_min=0.0)
        for w in {str(w.message) for w in caught}:
            log.warning("Mondrian intervals at level %g: %s", level, w)
        lower[ok], upper[ok] = bounds[:, 0], bounds[:, 1]
        return lower, upper

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "std": "recalibrated", "classes": self.classes, "metal_p": self.metal_p,
                "metal_threshold": self.metal_threshold, "gap_edges": list(self.gap_edges), "pooled": list(self.pooled),
                "n": [int(s.size) for s in self.scores], "scores": [[float(x) for x in s] for s in self.scores]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MondrianIntervals:
        if not isinstance(d, dict) or d.get("kind") != KIND or "scores" not in d:
            raise ValueError(f"not a {KIND} dict (need kind={KIND!r} and scores)")
        return cls(d["scores"], metal_p=float(d.get("metal_p", 0.5)), gap_edges=tuple(d.get("gap_edges", (1.0, 3.0))),
                   metal_threshold=float(d.get("metal_threshold", METAL_THRESHOLD)), pooled=tuple(d.get("pooled", ())))

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any] | None) -> MondrianIntervals | None:
        """The intervals stored in a card's ``calibration["mondrian"]``; None for a card without them."""
        section = (calibration or {}).get("mondrian")
        return None if section is None else cls.from_dict(section)

    def __repr__(self) -> str:
        return f"MondrianIntervals(classes={self.classes}, n={[int(s.size) for s in self.scores]}, pooled={list(self.pooled)})"
