"""What a predicted band gap means: the probabilities in words, and the predictive distribution
they (and the histogram's curve) come from.

The API reports ``band_gap`` (the mean of the draws or members), ``std`` (their spread recalibrated
on validation), ``lower``/``upper`` (the interval at ``level``) and ``p_metal`` / ``p_window`` from
the predictive mixture of :mod:`matbalora.probabilities`: one Gaussian per draw, each widened so the
mixture has mean ``band_gap`` and std ``std``, its mass below 0 eV moved to 0 eV (a gap is never
negative): a density on (0, inf) plus a point mass at 0. The page shows these numbers as returned;
nothing here recomputes an interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from matbalora import probabilities

#: Words for a probability (the IPCC's calibrated likelihood scale): the first whose lower edge it reaches.
LIKELIHOOD: tuple[tuple[float, str], ...] = (
    (0.99, "virtually certain"), (0.90, "very likely"), (0.66, "likely"), (0.33, "about as likely as not"),
    (0.10, "unlikely"), (0.01, "very unlikely"), (0.0, "exceptionally unlikely"))


def likelihood(p: float) -> str:
    """The words for probability ``p`` in [0, 1], e.g. 0.03 -> 'very unlikely'."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} must be a probability in [0, 1]")
    return next(words for edge, words in LIKELIHOOD if p >= edge)


def _ev(x: float) -> str:
    return f"{x:g} eV"


def window_event(window: tuple[float, float]) -> str:
    """``(1, 2)`` -> '1 eV ≤ gap ≤ 2 eV'; an infinite ``hi`` -> 'gap ≥ 1 eV'."""
    lo, hi = window
    return f"gap ≥ {_ev(lo)}" if math.isinf(hi) else f"{_ev(lo)} ≤ gap ≤ {_ev(hi)}"


def _finite(row: Mapping[str, float], *keys: str) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in keys)


def probabilities_text(row: Mapping[str, float], window: tuple[float, float] | None = None) -> str:
    """'P(metal) = 0.03; P(1 eV ≤ gap ≤ 2 eV) = 0.71' from a prediction row's ``p_metal`` (and
    ``p_window`` for ``window``, eV); '' when the row has no finite ``p_metal``."""
    if not _finite(row, "p_metal"):
        return ""
    text = f"P(metal) = {row['p_metal']:.2f}"
    if window is not None and _finite(row, "p_window"):
        text += f"; P({window_event(window)}) = {row['p_window']:.2f}"
    return text


def reading(row: Mapping[str, float], *, level: float, window: tuple[float, float] | None = None) -> str:
    """One plain line from a prediction row (band_gap, lower, upper, p_metal and, with ``window``,
    p_window), e.g. 'very unlikely to be a metal (P = 0.03); likely to have a gap in 1–2 eV (P = 0.71);
    90% interval 1.20–3.10 eV'."""
    if not _finite(row, "band_gap", "lower", "upper", "p_metal"):
        return "no prediction"
    parts = [f"{likelihood(row['p_metal'])} to be a metal (P = {row['p_metal']:.2f})"]
    if window is not None and _finite(row, "p_window"):
        lo, hi = window
        span = f"above {_ev(lo)}" if math.isinf(hi) else f"in {lo:g}–{hi:g} eV"
        parts.append(f"{likelihood(row['p_window'])} to have a gap {span} (P = {row['p_window']:.2f})")
    parts.append(f"{100 * level:g}% interval {row['lower']:.2f}–{row['upper']:.2f} eV")
    return "; ".join(parts)


def _mixture(draws, std: float) -> tuple[np.ndarray, float]:
    """Centres [S] eV and common width (eV) of the predictive mixture of one crystal."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std={std!r} eV must be finite and > 0")
    draws = np.asarray(draws, dtype=np.float64).reshape(-1, 1)
    if draws.size == 0 or not np.all(np.isfinite(draws)):
        raise ValueError("draws must be one or more finite gaps (eV)")
    centres, tau = probabilities.mixture(draws, np.array([std]))
    return centres, float(tau[0])


def predictive_density(draws, std: float, x) -> np.ndarray:
    """[len(x)] density (1/eV) at gaps ``x`` (eV) of the mixture behind ``p_metal``/``p_window``
    (``draws``: [S] eV, ``std``: the recalibrated std, eV); 0 below 0 eV, where the reported gap has
    no density (that mass sits at 0 eV, see ``mass_at_zero``), and NaN when the mixture has no
    width (``std`` below the draws' own spread: point masses, no density)."""
    centres, tau = _mixture(draws, std)
    x = np.asarray(x, dtype=np.float64)
    if tau <= 0:
        return np.full(x.shape, np.nan)
    z = (x[None, :] - centres) / tau  # [S, len(x)]
    pdf = (np.exp(-0.5 * z**2) / (tau * math.sqrt(2 * math.pi))).mean(0)
    return np.where(x < 0, 0.0, pdf)


def mass_at_zero(draws, std: float) -> float:
    """Probability that the reported gap is exactly 0 eV: the mixture's mass at or below 0 eV."""
    centres, tau = _mixture(draws, std)
    return float(probabilities.gap_cdf(centres, np.array([tau]), 0.0)[0])
