"""What a predicted band gap means: plain-language classes, and the predictive distribution the
reported interval is taken from.

The API reports ``band_gap`` (the mean of the draws or members), ``std`` (their spread recalibrated
on validation) and the central Gaussian interval of N(band_gap, std^2) with both bounds clipped at
0 eV (``matbalora.calibration.gaussian_interval``). The distribution that matches those numbers is
that Gaussian with the mass it puts below 0 eV moved to 0 eV (a gap is never negative): a density
on (0, inf) plus a point mass at 0.
"""

from __future__ import annotations

import math

import numpy as np

#: Upper edges (PBE band gap, eV) of the plain-language classes.
GAP_CLASSES: tuple[tuple[float, str], ...] = (
    (0.1, "metal"), (1.5, "small-gap semiconductor"), (3.5, "semiconductor"), (math.inf, "wide-gap insulator"))
#: Gaps below this (eV) read as a metal.
METAL_EDGE = GAP_CLASSES[0][0]


def gap_class(gap: float) -> str:
    return next(name for edge, name in GAP_CLASSES if max(gap, 0.0) < edge)


def reading(band_gap: float, lower: float, upper: float) -> str:
    """One plain line, e.g. 'likely a metal' or 'a wide-gap insulator; uncertain (could be a semiconductor)'."""
    if not all(math.isfinite(x) for x in (band_gap, lower, upper)):
        return "no prediction"
    names = [name for _, name in GAP_CLASSES]
    here, low, high = gap_class(band_gap), names.index(gap_class(lower)), names.index(gap_class(upper))
    if low == high:
        return f"likely a {here}"
    others = [name for name in names[low:high + 1] if name != here]
    return f"a {here}; uncertain (could be {' or '.join('a ' + o for o in others)})"


def _check(mean: float, std: float) -> None:
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"mean={mean!r} eV and std={std!r} eV must be finite, std > 0")


def predictive_density(mean: float, std: float, x: np.ndarray) -> np.ndarray:
    """[len(x)] density (1/eV) of N(mean, std^2) at gaps ``x`` (eV); 0 below 0 eV, where the clipped
    distribution has no density (its mass there sits at 0 eV, see ``mass_at_zero``)."""
    _check(mean, std)
    x = np.asarray(x, dtype=np.float64)
    pdf = np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return np.where(x < 0, 0.0, pdf)


def mass_at_zero(mean: float, std: float) -> float:
    """Probability N(mean, std^2) puts below 0 eV: the share of the clipped distribution at exactly 0 eV."""
    _check(mean, std)
    return 0.5 * math.erfc(mean / (std * math.sqrt(2)))
