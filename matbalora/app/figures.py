"""The plotly figures of one result: both intervals on one axis, and the BaLoRA draws with the
predictive distribution their probabilities come from (the 3D cell is in ``structure_view``).
Intervals are drawn from ``lower``/``upper`` as ``predict`` returns them, and the metal band is
``METAL_THRESHOLD`` wide, the edge ``p_metal`` counts below.

Labels sit where data cannot reach them (tick labels, the legend, above the plotting area), so
metals (everything at 0 eV) and wide gaps (a 10 eV axis) read the same way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from matbalora.app.gaps import mass_at_zero, predictive_density
from matbalora.defaults import METAL_THRESHOLD

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from matbalora.app.predictions import Prediction

BALORA_COLOR, ENSEMBLE_COLOR = "#d62728", "#1f77b4"
MARGIN = {"l": 10, "r": 10, "t": 60, "b": 40}


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def _span(row: dict[str, float]) -> str:
    return f"{row['band_gap']:.2f} eV [{row['lower']:.2f}, {row['upper']:.2f}]"


def _metal_band(fig: go.Figure) -> None:
    """Grey band 0 .. METAL_THRESHOLD eV (where ``p_metal`` counts a metal), labelled above the
    plotting area (never over a bar or a curve)."""
    fig.add_vrect(x0=0, x1=METAL_THRESHOLD, fillcolor="grey", opacity=0.15, line_width=0)
    fig.add_annotation(x=0, y=1, xref="x", yref="paper", yanchor="bottom", xanchor="left", showarrow=False,
                       text=f"grey: metal (≤ {METAL_THRESHOLD:g} eV)", font={"size": 11, "color": "grey"})


def interval_figure(pred: Prediction) -> go.Figure:
    """BaLoRA and deep-ensemble intervals on one axis, one row each; the numbers are the row labels."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = (("BaLoRA", pred.balora, BALORA_COLOR), ("Deep ensemble (LoRA)", pred.ensemble, ENSEMBLE_COLOR))
    for name, row, color in rows:
        fig.add_trace(go.Scatter(
            x=[row["band_gap"]], y=[name], mode="markers", marker={"size": 12, "color": color}, name=name,
            error_x={"type": "data", "symmetric": False, "array": [row["upper"] - row["band_gap"]],
                     "arrayminus": [row["band_gap"] - row["lower"]], "thickness": 4, "width": 10},
            hovertemplate=f"{name}: %{{x:.2f}} eV<br>{_pct(pred.level)} interval "
                          f"{row['lower']:.2f}–{row['upper']:.2f} eV<extra></extra>",
        ))
    _metal_band(fig)
    high = max(pred.balora["upper"], pred.ensemble["upper"], 1.0)
    fig.update_yaxes(tickvals=[name for name, _, _ in rows],
                     ticktext=[f"{name}<br>{_span(row)}" for name, row, _ in rows])
    fig.update_layout(title={"text": f"PBE band gap with {_pct(pred.level)} intervals", "x": 0, "xanchor": "left"},
                      xaxis_title="band gap (eV)", xaxis_range=[-0.05 * high, 1.08 * high], showlegend=False,
                      height=280, margin=MARGIN)
    return fig


def samples_figure(pred: Prediction, *, points: int = 400) -> go.Figure:
    """The BaLoRA draws (histogram, counts on the right axis) over the predictive mixture that
    ``p_metal``/``p_window`` come from (each draw widened so the mixture has mean band_gap and the
    recalibrated std; left axis, its mass below 0 eV marked at 0 eV), the reported interval
    ``lower``..``upper`` shaded under it. Every label is in the legend below the plot."""
    import plotly.graph_objects as go

    b, draws = pred.balora, np.asarray(pred.draws, dtype=float)
    mean, std = b["band_gap"], b["std"]
    fig = go.Figure()
    high = max(b["upper"], mean + 3.5 * std if math.isfinite(std) else 0.0, float(draws.max(initial=0.0)), 0.5) * 1.05
    usable = draws.size > 0 and math.isfinite(std) and std > 0
    x = np.union1d(np.linspace(0.0, high, points), [b["lower"], b["upper"]])  # the bounds exactly on the grid
    y = predictive_density(draws, std, x) if usable else np.full(x.shape, np.nan)
    if np.all(np.isfinite(y)):
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line={"color": "black", "width": 2},
                                 name=f"predictive density: the draws widened to σ {std:.2f} eV (recalibrated), gap ≥ 0",
                                 hovertemplate="%{x:.2f} eV: %{y:.3f} /eV<extra></extra>"))
        inside = (x >= b["lower"]) & (x <= b["upper"])
        fig.add_trace(go.Scatter(x=x[inside], y=y[inside], mode="lines", fill="tozeroy", line={"width": 0},
                                 fillcolor="rgba(214,39,40,0.18)", hoverinfo="skip",
                                 name=f"{_pct(pred.level)} interval {b['lower']:.2f}–{b['upper']:.2f} eV"))
        at_zero = mass_at_zero(draws, std)
        if at_zero >= 0.005:
            fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", cliponaxis=False,
                                     marker={"symbol": "triangle-up", "size": 14, "color": "black"},
                                     name=f"P(gap = 0 eV) = {at_zero:.0%} (the mass below 0, moved to 0)",
                                     hovertemplate=f"{at_zero:.1%} of the distribution at 0 eV<extra></extra>"))
        fig.add_trace(go.Scatter(x=[mean, mean], y=[0.0, float(predictive_density(draws, std, [max(mean, 0.0)])[0])],
                                 mode="lines", line={"color": "black", "dash": "dash"}, name=f"mean {mean:.2f} eV",
                                 hoverinfo="skip"))
    # a model with several gap heads: every draw of every head is one sample
    counted = f"{draws.size // pred.heads} draws × {pred.heads} gap heads" if pred.heads > 1 else f"{draws.size} draws"
    if draws.size:
        fig.add_trace(go.Histogram(x=draws, nbinsx=max(5, min(40, draws.size // 2)), yaxis="y2",
                                   marker_color=BALORA_COLOR, opacity=0.6,
                                   name=f"{counted} (Monte Carlo; raw spread {draws.std(ddof=1) if draws.size > 1 else 0.0:.2f} eV)"))
    _metal_band(fig)
    fig.update_layout(
        title={"text": f"BaLoRA: {counted} and the predictive distribution", "x": 0, "xanchor": "left"},
        xaxis={"title": "band gap (eV)", "range": [-0.04 * high, high]},
        yaxis={"title": "density (1/eV)", "rangemode": "tozero"},
        yaxis2={"title": "draws (count)", "overlaying": "y", "side": "right", "rangemode": "tozero", "showgrid": False},
        legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0, "font": {"size": 11}},
        height=420, margin={**MARGIN, "b": 10}, bargap=0.05)
    return fig
