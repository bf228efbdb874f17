"""Predictions for the pages: both models on one structure (with the BaLoRA draws behind its row),
a page's structures under its time bound, and the batch table both pages show and download.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matbalora.app.gaps import reading
from matbalora.app.uploads import Item, Limits
from matbalora.defaults import LEVEL

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.core import Structure

    from matbalora.predict import EnsemblePredictor, Predictor

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prediction:
    """BaLoRA and deep-ensemble predictions for one structure.

    ``balora``/``ensemble``: the columns of ``predict`` as returned: band_gap, std, lower, upper (eV),
    p_metal and, when ``window`` (lo, hi) eV was asked for, p_window; ``draws``: [S] the Monte-Carlo
    band gaps behind ``balora`` (eV; S = draws x ``heads``, the model's gap heads); ``error``: why there
    is no prediction; ``seconds``: wall time.
    """

    balora: dict[str, float]
    ensemble: dict[str, float]
    draws: np.ndarray = field(default_factory=lambda: np.empty(0))
    level: float = LEVEL
    error: str = ""
    seconds: float = 0.0
    window: tuple[float, float] | None = None
    heads: int = 1


@dataclass
class Models:
    """The BaLoRA model and the deep ensemble, shared by every session of a server.

    Two sessions may predict at once: a model's sampling state is per thread (``noise_context``), and
    a crystal's draws depend only on the crystal and the seed, so no lock is needed.
    """

    model: Predictor
    ensemble: EnsemblePredictor
    folder: Path

    def predict(self, structure: Structure, *, samples: int, level: float, window: tuple[float, float] | None = None,
                seed: int = 0) -> Prediction:
        return predict_structure(self.model, self.ensemble, structure, samples=samples, level=level, window=window, seed=seed)


def load_models(models: str | os.PathLike | None = None) -> Models:
    """The BaLoRA model (``balora/``) and the deep ensemble (``lora_ensemble/``) of a models folder
    (default: the shipped one, or ``$MATBALORA_MODELS``)."""
    from matbalora.api import load_ensemble, load_model, models_dir

    folder = Path(models) if models is not None else models_dir()
    return Models(load_model(folder / "balora"), load_ensemble(folder / "lora_ensemble"), folder)


#: The columns of ``predict`` a Prediction keeps for each model (and ``p_window`` with a window).
PREDICTION_KEYS: tuple[str, ...] = ("band_gap", "std", "lower", "upper", "p_metal")
#: The gap window (eV) the pages start with.
WINDOW: tuple[float, float] = (1.0, 2.0)


def predict_structure(model: Predictor, ensemble: EnsemblePredictor, structure: Structure, *,
                      samples: int, level: float, window: tuple[float, float] | None = None, seed: int = 0) -> Prediction:
    """Both predictions for one structure (``window``: (lo, hi) eV for ``p_window``), and the
    Monte-Carlo draws behind the BaLoRA row."""
    from matbalora.predict import Predictor, prepare
    from matbalora.probabilities import check_window

    class KeepDraws(Predictor):  # the same model; remembers the draws predict_prepared summarises
        def sample(self, prep, *, samples, seed=0):
            self.draws = super().sample(prep, samples=samples, seed=seed)
            return self.draws

    window = None if window is None else check_window(window)
    start = time.perf_counter()
    prep = prepare(model.model, [structure], ["upload"])
    keeper = KeepDraws(model.model, model.config)
    ours = keeper.predict_prepared(prep, samples=samples, level=level, seed=seed, window=window).iloc[0]
    if ours["error"]:
        return Prediction({}, {}, level=level, error=ours["error"], seconds=time.perf_counter() - start, window=window)
    theirs = ensemble.predict_prepared(prep, level=level, window=window).iloc[0]
    keys = PREDICTION_KEYS + (("p_window",) if window is not None else ())
    return Prediction({k: float(ours[k]) for k in keys}, {k: float(theirs[k]) for k in keys},
                      keeper.draws.gaps[:, 0], level, "", time.perf_counter() - start, window, keeper.draws.members)


def out_of_time(started: float, *, limits: Limits = Limits()) -> str:
    """The reason a page's predictions stop (``started``: ``time.monotonic()`` at the first), or ""."""
    if time.monotonic() - started > limits.max_predict_seconds:
        return f"skipped: this page's prediction time ({limits.max_predict_seconds} s) is used up; upload fewer structures"
    return ""


def predict_items(items: Sequence[Item], predict: Callable[[Item], Prediction], *, level: float,
                  limits: Limits = Limits(), progress: Callable[[int, int], None] | None = None) -> dict[str, Prediction]:
    """One Prediction per readable item, keyed by id, in order. ``predict(item)`` makes one; one that
    raises becomes that item's error (logged), and once the page has spent ``limits.max_predict_seconds``
    the rest are skipped with the reason. ``progress(done, total)`` is called after each."""
    good = [item for item in items if item.structure is not None]
    preds: dict[str, Prediction] = {}
    started = time.monotonic()
    for n, item in enumerate(good):
        if spent := out_of_time(started, limits=limits):
            preds[item.id] = Prediction({}, {}, level=level, error=spent)
        else:
            try:
                preds[item.id] = predict(item)
            except Exception as exc:  # noqa: BLE001 - one failing structure must not take the page down
                log.exception("prediction failed for %s", item.id)
                preds[item.id] = Prediction({}, {}, level=level, error=f"prediction failed: {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(n + 1, len(good))
    return preds


def batch_table(rows: Sequence[tuple[Item, Prediction | None]], *, window: tuple[float, float] | None = None) -> pd.DataFrame:
    """One row per item for the sortable table and its CSV: gaps, bounds and std in eV, ``p_metal``
    and, with ``window`` (the one the predictions were made with), ``p_window`` of both models, the
    reading, the level and the window's edges (eV)."""
    import pandas as pd

    keys = ("band_gap", "lower", "upper", "std", "p_metal") + (("p_window",) if window is not None else ())
    records = []
    for item, pred in rows:
        ok = item.structure is not None and pred is not None and not pred.error
        if ok and pred.window != window:
            raise ValueError(f"the prediction of {item.id!r} has window={pred.window!r}, the table window={window!r}")
        rec: dict[str, Any] = {"file": item.source, "structure": item.id,
                               "formula": item.structure.composition.reduced_formula if item.structure else "",
                               "atoms": len(item.structure) if item.structure else None}
        for prefix, part in (("balora", "balora"), ("ensemble", "ensemble")):
            values = getattr(pred, part) if ok else {}
            for key in keys:
                rec[f"{prefix}_{key}"] = values.get(key, math.nan)
        rec["reading"] = reading(pred.balora, level=pred.level, window=window) if ok else ""
        rec["level"] = pred.level if ok else math.nan
        if window is not None:
            rec["window_lo"], rec["window_hi"] = window
        rec["message"] = item.error or (pred.error if pred is not None else "")
        records.append(rec)
    return pd.DataFrame.from_records(records)

