"""Smoke tests for matbalora.plots: every plot renders to a non-empty file."""

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from matbalora import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y_true = np.concatenate([np.zeros(20), rng.uniform(0.5, 5.0, 40)])
    y_std = rng.uniform(0.05, 0.5, 60)
    y_pred = y_true + y_std * rng.normal(size=60)
    return y_pred, y_std, y_true


PLOTS = [plots.parity, plots.calibration_curve, plots.sparsification_curve, plots.error_vs_std]


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_plot_writes_png(plot, data, tmp_path):
    ax = plot(*data)
    assert isinstance(ax, Axes)
    out = plots.save_figure(ax.figure, tmp_path / f"{plot.__name__}.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_plot_uses_given_axes(plot, data):
    fig = Figure()
    ax = fig.add_subplot()
    assert plot(*data, ax=ax) is ax
    assert ax.get_xlabel() and ax.get_ylabel()


@pytest.mark.parametrize(
    "plot", [plots.parity, plots.sparsification_curve, plots.error_vs_std], ids=lambda f: f.__name__
)
def test_labels_carry_units(plot, data):
    ax = plot(*data)
    assert "(eV)" in ax.get_ylabel()
    if plot is not plots.sparsification_curve:
        assert "(eV)" in ax.get_xlabel()


def test_calibration_curve_labels_are_fractions(data):
    ax = plots.calibration_curve(*data)
    assert "(fraction)" in ax.get_xlabel() and "(fraction)" in ax.get_ylabel()


def test_save_figure_svg_and_bad_suffix(data, tmp_path):
    ax = plots.parity(*data)
    out = plots.save_figure(ax.figure, tmp_path / "sub" / "parity.svg")
    assert b"<svg" in out.read_bytes()[:1000]
    with pytest.raises(ValueError, match="parity.pdf"):
        plots.save_figure(ax.figure, tmp_path / "parity.pdf")
    with pytest.raises(TypeError, match="Figure"):
        plots.save_figure(ax, tmp_path / "parity.png")


def test_plots_validate_inputs():
    with pytest.raises(ValueError, match="y_true"):
        plots.parity([1.0, 2.0], [0.1, 0.1], [1.0])
    with pytest.raises(TypeError, match="ax"):
        plots.parity([1.0], [0.1], [1.0], ax="not axes")
