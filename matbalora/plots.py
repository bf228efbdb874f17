"""Diagnostic plots for band-gap predictions with uncertainty.

Each plot takes ``(y_pred, y_std, y_true)`` (eV), draws on ``ax`` or, when ``ax`` is None,
on a new :class:`matplotlib.figure.Figure` that is not registered with pyplot (so nothing
depends on the backend and no global figure state leaks), and returns the Axes. Use
:func:`save_figure` to write ``ax.figure`` to PNG or SVG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from matbalora.atomic import atomic_write
from matbalora.calibration import check_arrays
from matbalora.metrics import (
    interval_proportions,
    miscalibration_area,
    sparsification_curves,
)

__all__ = ["parity", "calibration_curve", "sparsification_curve", "error_vs_std", "save_figure"]

_FORMATS = {".png": "png", ".svg": "svg"}


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        return Figure(figsize=(4.5, 4.5), layout="constrained").add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def parity(
    y_pred: Any, y_std: Any, y_true: Any, ax: Axes | None = None, *, n_std: float = 1.0
) -> Axes:
    """Predicted vs reference gap with ``+- n_std * y_std`` error bars and the y = x line."""
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    ax = _axes(ax)
    ax.errorbar(
        y_true, y_pred, yerr=n_std * y_std, fmt="o", ms=3, alpha=0.6,
        elinewidth=0.8, label=f"prediction ± {n_std:g}σ",
    )
    lo = min(0.0, y_true.min(), (y_pred - n_std * y_std).min())
    hi = max(y_true.max(), (y_pred + n_std * y_std).max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ideal")
    ax.set_xlabel("Reference band gap (eV)")
    ax.set_ylabel("Predicted band gap (eV)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper left")
    return ax


def calibration_curve(
    y_pred: Any, y_std: Any, y_true: Any, ax: Axes | None = None, *, num_bins: int = 100
) -> Axes:
    """Observed vs expected proportion in centred intervals, with the miscalibration area."""
    expected, observed = interval_proportions(y_pred, y_std, y_true, num_bins=num_bins)
    area = miscalibration_area(y_pred, y_std, y_true, num_bins=num_bins)
    ax = _axes(ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.plot(expected, observed, lw=2, label="model")
    ax.fill_between(expected, expected, observed, alpha=0.2, label=f"miscal. area {area:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Expected proportion in interval (fraction)")
    ax.set_ylabel("Observed proportion in interval (fraction)")
    ax.legend(loc="upper left")
    return ax


def sparsification_curve(
    y_pred: Any,
    y_std: Any,
    y_true: Any,
    ax: Axes | None = None,
    *,
    num_fractions: int = 100,
    normalise: bool = False,
) -> Axes:
    """MAE of the remaining crystals as the most uncertain are removed: model vs oracle.

    Curves are in eV unless ``normalise`` (then divided by the MAE of all crystals).
    """
    fractions, model, oracle = sparsification_curves(
        y_pred, y_std, y_true, num_fractions=num_fractions, normalise=normalise
    )
    ax = _axes(ax)
    ax.plot(fractions, oracle, "k--", lw=1, label="oracle (by true error)")
    ax.plot(fractions, model, lw=2, label="model (by predicted std)")
    ax.fill_between(fractions, oracle, model, alpha=0.2, label="sparsification error")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Fraction of most uncertain crystals removed")
    ax.set_ylabel("MAE of remaining (relative to full MAE)" if normalise else "MAE of remaining (eV)")
    ax.legend(loc="lower left")
    return ax


def error_vs_std(
    y_pred: Any, y_std: Any, y_true: Any, ax: Axes | None = None, *, num_bins: int = 10
) -> Axes:
    """Absolute error vs predicted std, with binned RMSE vs RMV (the ENCE bins) and y = x."""
    y_pred, y_std, y_true = check_arrays(y_pred, y_std, y_true)
    err = np.abs(y_pred - y_true)
    ax = _axes(ax)
    ax.scatter(y_std, err, s=6, alpha=0.4, label="crystals")
    order = np.argsort(y_std, kind="stable")
    bins = np.array_split(order, min(num_bins, order.size))
    rmv = [np.sqrt(np.mean(y_std[b] ** 2)) for b in bins]
    rmse = [np.sqrt(np.mean(err[b] ** 2)) for b in bins]
    ax.plot(rmv, rmse, "o-", color="C1", label="binned RMSE vs RMV")
    hi = max(y_std.max(), err.max())
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="ideal")
    ax.set_xlabel("Predicted std (eV)")
    ax.set_ylabel("Absolute error (eV)")
    ax.legend(loc="upper left")
    return ax


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (``.png`` or ``.svg``) atomically; return the path.

    Uses :func:`matbalora.atomic.atomic_write` (temporary file in the same folder, then
    ``os.replace``), so a reader never sees a half-written file; missing parent folders
    are created.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path must end in .png or .svg, got {str(path)!r}")

    def _write(tmp: str) -> None:
        fig.savefig(tmp, format=fmt, dpi=150)
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600

    atomic_write(path, _write)
    return path
