"""Probability that a crystal is a metal, or that its gap lies in a window, from its predictive
distribution.

The predictive distribution of a crystal's latent gap ``Y`` is a mixture with one Gaussian per
Monte-Carlo draw (or ensemble member) ``g_s``, each widened by the same noise ``tau``:
``Y ~ (1/S) sum_s N(g_s, tau^2)``, with ``tau^2 = std^2 - v`` (``v``: variance of the draws, ddof 0;
``std``: the recalibrated std), so that the mixture's mean is ``band_gap`` and its std is ``std``.
Where ``std^2 < v`` (a recalibration scale below 1 shrank the spread) the draws are pulled towards
their mean by ``std / sqrt(v)`` and ``tau = 0``. One draw (``samples=0``, a deterministic model):
``N(band_gap, std^2)``. NaN ``std`` gives NaN probabilities.

The reported gap is ``max(0, Y)``: a point mass ``P(Y <= 0)`` at 0 eV and a density above it. A
crystal counts as a metal when its gap is at most ``METAL_THRESHOLD`` eV, so
``p_metal = P(Y <= METAL_THRESHOLD)``, and ``p_window(lo, hi) = P(lo <= max(0, Y) <= hi)``: the point
mass at 0 belongs to a window with ``lo = 0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import ndtr

from matbalora.defaults import METAL_THRESHOLD

__all__ = ["METAL_THRESHOLD", "check_window", "mixture", "gap_cdf", "p_metal", "p_window"]


def check_window(window: Any) -> tuple[float, float]:
    """``(lo, hi)`` eV as floats; ValueError unless ``0 <= lo < hi`` (``hi`` may be ``inf``)."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r} must be two numbers (lo, hi) in eV") from None
    if math.isnan(lo) or math.isnan(hi) or not 0.0 <= lo < hi or lo == math.inf:
        raise ValueError(f"window=({lo:g}, {hi:g}) eV must have 0 <= lo < hi")
    return lo, hi


def mixture(gaps: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
    """Components of the predictive mixture: centres ``[S, n]`` eV and common width ``tau`` ``[n]`` eV.

    Args:
        gaps: ``[S, n]`` draws or member predictions, eV (``[n]``: one draw).
        std: ``[n]`` recalibrated std, eV (NaN allowed).
    """
    gaps = np.atleast_2d(np.asarray(gaps, dtype=np.float64))
    std = np.asarray(std, dtype=np.float64)
    if std.shape != gaps.shape[1:]:
        raise ValueError(f"std has shape {std.shape}, expected {gaps.shape[1:]} (one per crystal of gaps {gaps.shape})")
    mean = gaps.mean(0)
    var = gaps.var(0)
    pulled = std**2 < var
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.where(pulled, std / np.sqrt(var), 1.0)
        tau = np.where(pulled, 0.0, np.sqrt(np.clip(std**2 - var, 0.0, None)))
    centres = mean + shrink * (gaps - mean)
    return centres, tau


def gap_cdf(centres: np.ndarray, tau: np.ndarray, x: float) -> np.ndarray:
    """``[n]`` P(Y <= x) under the mixture (``tau = 0``: a share of point masses); NaN where tau is NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - centres) / tau
    p = np.where(tau > 0, ndtr(z), (centres <= x).astype(np.float64)).mean(0)
    p[np.isnan(tau)] = np.nan
    return p


def p_metal(gaps: Any, std: Any, *, threshold: float = METAL_THRESHOLD) -> np.ndarray:
    """``[n]`` probability that the gap is at most ``threshold`` eV (a metal)."""
    return gap_cdf(*mixture(gaps, std), threshold)


def p_window(gaps: Any, std: Any, window: Any) -> np.ndarray:
    """``[n]`` probability that the gap ``max(0, Y)`` lies in ``[lo, hi]`` eV (the mass at 0 counts when ``lo = 0``)."""
    lo, hi = check_window(window)
    centres, tau = mixture(gaps, std)
    upper = gap_cdf(centres, tau, hi) if math.isfinite(hi) else np.where(np.isnan(tau), np.nan, 1.0)
    return upper - gap_cdf(centres, tau, lo) if lo > 0 else upper
