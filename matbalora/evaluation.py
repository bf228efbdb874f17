"""Evaluate a model (and optionally an ensemble) on labelled data: metrics on all crystals and on
non-metals, coverage before and after recalibration, and the standard uncertainty plots.

Recalibration is never fitted here: the std scale and the conformal quantile come from the model
folder, where they were fitted on the validation split at training time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from matbalora.atomic import write_json, write_text
from matbalora.calibration import ConformalIntervals
from matbalora.data.readers import load_dataset
from matbalora.defaults import LEVEL, SAMPLES
from matbalora.metrics import evaluate, interval_coverage
from matbalora.plots import calibration_curve, error_vs_std, parity, save_figure, sparsification_curve
from matbalora.predict import EnsemblePredictor, Predictor, prepare, raw_total_std


def score_frame(frame: pd.DataFrame, y_true: np.ndarray, *, raw_std: np.ndarray, conformal: dict | None) -> dict:
    """Metrics of one prediction frame (``std`` recalibrated) and of its ``raw_std`` (the model's own
    spread, before recalibration); conformal coverage where the model card holds a quantile."""
    pred, std = frame["band_gap"].to_numpy(float), frame["std"].to_numpy(float)
    ok = np.isfinite(pred)
    pred, std, y, raw = pred[ok], std[ok], y_true[ok], np.asarray(raw_std, dtype=float)[ok]
    result: dict = {"n": int(ok.sum())}
    if not np.all(np.isfinite(std)) or np.all(std == 0):
        result["calibrated"] = {k: v for k, v in evaluate(pred, np.zeros_like(pred), y).items() if k.endswith(("mae", "rmse", "r2", "n"))}
        return result
    result["uncalibrated"] = evaluate(pred, raw, y)
    result["calibrated"] = evaluate(pred, std, y)
    if conformal:
        ci = ConformalIntervals.from_dict(conformal)
        # quantiles fitted before recalibration had a floor were fitted on the raw spread
        lo, hi = ci.interval(pred, std if conformal.get("std") == "recalibrated" else raw)
        nonmetal = y > 0
        result["conformal"] = {
            "level": ci.level,
            "coverage": interval_coverage(lo, hi, y),
            "nonmetal_coverage": interval_coverage(lo[nonmetal], hi[nonmetal], y[nonmetal]) if nonmetal.any() else float("nan"),
            "mean_width": float(np.mean(hi - lo)),
        }
    return result


def plot_all(frame: pd.DataFrame, y_true: np.ndarray, out: Path, prefix: str) -> list[Path]:
    pred, std = frame["band_gap"].to_numpy(float), frame["std"].to_numpy(float)
    ok = np.isfinite(pred) & np.isfinite(std)
    if ok.sum() < 2:
        return []
    paths = []
    for name, fn in (("parity", parity), ("calibration", calibration_curve), ("sparsification", sparsification_curve), ("error_vs_std", error_vs_std)):
        ax = fn(pred[ok], std[ok], y_true[ok])
        paths.append(save_figure(ax.figure, out / f"{prefix}_{name}.png"))
    return paths


def evaluate_on_data(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: Predictor,
    ensemble: EnsemblePredictor | None = None,
    samples: int = SAMPLES,
    level: float = LEVEL,
    max_structures: int | None = None,
    plots: bool = True,
) -> dict:
    """Predict every structure of ``data`` and write ``metrics.json``, ``predictions.csv`` and plots to ``out``."""
    out = Path(out)
    ds = load_dataset(data, on_invalid="skip", max_structures=max_structures)
    prep = prepare(model.model, ds.structures, ds.ids)
    y = ds.targets
    frames = {"model": model.predict_prepared(prep, samples=samples, level=level)}
    sources = {"model": model}
    if ensemble is not None:
        frames["ensemble"] = ensemble.predict_prepared(prep, level=level)
        sources["ensemble"] = ensemble
    report: dict = {"data": os.fspath(data), "n": len(ds), "rejected": ds.rejection_counts(), "samples": samples, "level": level}
    table = frames["model"][["id", "formula", "n_atoms"]].assign(band_gap_true=y)
    for name, frame in frames.items():
        cal = sources[name].config.get("calibration") or {}
        report[name] = score_frame(frame, y, raw_std=raw_total_std(frame["std_epistemic"].to_numpy(float), frame["std_aleatoric"].to_numpy(float)), conformal=cal.get("conformal"))
        for col in ("band_gap", "std", "lower", "upper"):
            table[f"{name}_{col}"] = frame[col].to_numpy()
        if plots:
            report[name]["plots"] = [p.name for p in plot_all(frame, y, out, name)]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "predictions.csv", table.to_csv(index=False))
    write_json(out / "metrics.json", report)
    return report
