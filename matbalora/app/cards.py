"""The shipped models' cards as tables a reader can take in, and the benchmark plots that belong to them.

Everything is read from the model folders at run time (``balora/config.json``,
``lora_ensemble/ensemble.json`` and its first member's ``config.json``): a retrained model changes
what is shown, never the code. A card may or may not carry non-metal metrics; rows and columns a card
lacks are left out. A benchmark plot is shown for a model only when the results file that lists it
scored a method with exactly the card's test metrics, so plots of other models (or of an older
training of this one) are never shown as this model's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"

#: Test metrics shown in the main table: card key -> label (keys a card lacks are skipped).
METRICS: dict[str, str] = {
    "mae": "MAE (eV)",
    "rmse": "RMSE (eV)",
    "r2": "R²",
    "spearman": "Spearman(|error|, std)",
    "coverage_68": "68% interval coverage",
    "coverage_90": "90% interval coverage",
    "coverage_95": "95% interval coverage",
    "mean_interval_width_90": "mean 90% interval width (eV)",
    "nll": "Gaussian NLL",
    "miscalibration_area": "miscalibration area",
    "ence": "ENCE",
    "auc_sparsification_error": "area under sparsification error",
}
#: Metrics that are means over crystals: the metals' value follows from all and non-metals.
_MEANS = ("mae", "coverage_68", "coverage_90", "coverage_95", "mean_interval_width_90", "nll")
#: Bootstrap intervals shown per model (``metrics.HEADLINE``): results key -> label.
INTERVAL_METRICS: dict[str, str] = {
    "mae": "MAE (eV)",
    "spearman": "Spearman(|error|, std), all crystals",
    "nonmetal_spearman": "Spearman(|error|, std), non-metals",
    "coverage": "coverage of the shipped 90% intervals",
}
#: Plots shown per model, with what they show.
PLOTS: dict[str, str] = {
    "calibration": "Calibration: observed vs expected share of test gaps inside central intervals of every level "
                   "(on the diagonal: calibrated; below it: over-confident).",
    "parity": "Parity: predicted vs PBE band gap on the test crystals, bars ±1 recalibrated σ.",
    "sparsification": "Sparsification: MAE of the test crystals left after removing the most uncertain first, "
                      "against the oracle that removes the largest errors first.",
}


def model_cards(models: str | os.PathLike | None = None) -> dict[str, dict]:
    """The config (model card) of the BaLoRA model and of the ensemble (with its first member's)."""
    from matbalora.api import models_dir
    from matbalora.checkpoint import read_config
    from matbalora.model_card import parse_card

    folder = Path(models) if models is not None else models_dir()
    cards: dict[str, dict] = {}
    try:
        cards["BaLoRA"] = read_config(folder / "balora")
    except (OSError, ValueError) as exc:
        cards["BaLoRA"] = {"error": str(exc)}
    try:
        ens = parse_card((folder / "lora_ensemble" / "ensemble.json").read_text(encoding="utf-8"))  # size and depth bounded
        first = ens["members"][0]
        if not isinstance(first, str) or "/" in first or first in ("", ".", ".."):
            raise ValueError(f"members[0]={first!r} is not a member folder name")
        cards["Deep ensemble"] = {**ens, "member card": read_config(folder / "lora_ensemble" / first)}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        cards["Deep ensemble"] = {"error": f"{folder / 'lora_ensemble'}: {exc}"}
    return cards


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def test_metrics(card: dict) -> dict[str, Any]:
    """The card's test metrics (recalibrated), ``{}`` when it has none."""
    test = (card.get("metrics") or {}).get("test")
    return test if isinstance(test, dict) else {}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _plain(value: float) -> str:
    return f"{value:,.0f}" if value.is_integer() else f"{value:.4g}"


def metrics_table(card: dict) -> pd.DataFrame:
    """Test metrics by class: one row per metric in ``METRICS`` the card has, columns ``all crystals``,
    ``non-metals`` (when the card has ``nonmetal_*`` values) and ``metals`` (for the per-crystal means,
    when the card has both counts: derived as (n·all − n_nm·non-metals) / (n − n_nm)). Values as text."""
    import pandas as pd

    test = test_metrics(card)
    n, n_nm = _number(test.get("n")), _number(test.get("nonmetal_n"))
    has_nm = any(_number(test.get(f"nonmetal_{k}")) is not None for k in METRICS)
    metals = n is not None and n_nm is not None and n > n_nm
    cols = {"all crystals" + (f" (n = {n:.0f})" if n else ""): []}
    if has_nm:
        cols["non-metals" + (f" (n = {n_nm:.0f})" if n_nm else "")] = []
    if has_nm and metals:
        cols[f"metals (n = {n - n_nm:.0f}, derived)"] = []
    index = []
    for key, label in METRICS.items():
        value = _number(test.get(key))
        if value is None:
            continue
        index.append(label)
        nm = _number(test.get(f"nonmetal_{key}"))
        row = [value] + ([nm] if has_nm else [])
        if has_nm and metals:
            row.append((n * value - n_nm * nm) / (n - n_nm) if key in _MEANS and nm is not None else None)
        for col, v in zip(cols.values(), row):
            col.append(_fmt(v))
    return pd.DataFrame(cols, index=index)


def other_numbers(card: dict) -> dict[str, str]:
    """Test-metric entries of the card not in ``metrics_table`` (timings, raw coverage, counts)."""
    shown = set(METRICS) | {f"nonmetal_{k}" for k in METRICS} | {"n", "nonmetal_n"}
    out = {}
    for key, value in test_metrics(card).items():
        if key not in shown and (v := _number(value)) is not None:
            out[key] = _plain(v)
    return out


def _get(card: dict, *path: str) -> Any:
    for key in path:
        card = card.get(key) if isinstance(card, dict) else None
    return card


def recipe_table(card: dict) -> dict[str, str]:
    """What the model was trained on and how: field -> value, only the fields the card has.
    An ensemble card reads its recipe from its first member and its data and calibration from itself."""
    member = card.get("member card", card)
    fields: list[tuple[str, Any]] = [
        ("method", member.get("method")),
        ("members", len(card["members"]) if isinstance(card.get("members"), list) else None),
        ("member seeds", ", ".join(map(str, card["seeds"])) if isinstance(card.get("seeds"), list) else None),
        ("backbone", " ".join(str(v) for v in (_get(member, "backbone", "name"), _get(member, "backbone", "version")) if v)),
        ("data", _get(card, "data", "source") or _get(member, "data", "source")),
        ("protocol", _get(card, "data", "protocol") or _get(member, "data", "protocol")),
    ]
    for part in ("n_train", "n_val", "n_test"):
        fields.append((f"crystals: {part[2:]}", _get(card, "data", part) or _get(member, "data", part)))
    adapter = member.get("adapter") or {}
    if adapter:
        blocks = adapter.get("last_blocks")
        fields += [("adapter rank / alpha", f"{adapter.get('rank')} / {adapter.get('alpha')}"),
                   ("adapted blocks", "all" if blocks == 0 else f"last {blocks}" if blocks else None),
                   ("Bayesian adapters", f"yes, noise {adapter.get('noise')}" if adapter.get("bayesian") else "no")]
    head = member.get("head") or {}
    if head:
        members = head.get("gap_members", 1)
        bagged = _get(member, "training", "rehead", "head_refit", "bootstrap") is True  # each head on its own resample of the rows
        heads = f"{members} {'bagged ' if bagged else ''}gap heads, each " if members > 1 else ""
        fields.append(("head", f"{heads}{head.get('layers')} layers x {head.get('hidden')}, "
                               f"{head.get('output')} output, {head.get('loss')} loss"))
    train = _get(member, "training", "config") or {}
    training = member.get("training") or {}
    # warm restarts: the card's config and times are its last run's; total_epochs counts every run
    fields.append(("training: epochs (all runs)", training.get("total_epochs", training.get("epochs_run"))))
    for key in ("batch_size", "lr", "beta", "seed"):
        if key != "beta" or member.get("method") == "balora":  # the KL weight means nothing without noise
            fields.append((f"training: {key.replace('_', ' ')}", train.get(key)))
    refit_mae = _get(member, "training", "rehead", "head_refit", "val_mae_after")
    fields += [("validation MAE of the adapter training (eV)" if refit_mae is not None else "best validation MAE (eV)", training.get("best_val_mae")),
               ("validation MAE after the gap-head refit (eV)", refit_mae),
               ("training time of the last run, s (per model)", training.get("train_seconds")),
               ("trainable parameters (per model)", _get(member, "training", "parameters", "trainable"))]
    cal = card.get("calibration") or {}
    if cal:
        fields += [("recalibration: scale k", cal.get("std_scale")), ("recalibration: floor c (eV)", cal.get("std_floor")),
                   ("recalibration fitted on", cal.get("fitted_on")), ("draws used for the fit", cal.get("samples"))]
    fields.append(("made by", card.get("command") or member.get("command")))
    out = {}
    for name, value in fields:
        if value is None or value == "":
            continue
        number = _number(value)
        out[name] = _plain(number) if number is not None else str(value)
    return out


def _same_metrics(card_test: dict, row: dict) -> bool:
    """True when every score the card and a results row share agrees (relative 1e-9), MAE included."""
    keys = [k for k in ("mae", "rmse", "nll", "coverage_90", "mean_interval_width_90", "spearman")
            if _number(card_test.get(k)) is not None and _number(row.get(k)) is not None]
    if "mae" not in keys or len(keys) < 2:
        return False
    return all(math.isclose(card_test[k], row[k], rel_tol=1e-9, abs_tol=1e-12) for k in keys)


def benchmark_method(card: dict, results: str | os.PathLike = RESULTS, *,
                     max_bytes: int = 64 * 2**20) -> tuple[Path, str, dict] | None:
    """(results JSON, method name, its contents) of the first results file under ``results`` that
    scored a method with exactly the card's test metrics; None when none did."""
    test = test_metrics(card)
    root = Path(results)
    if not test or not root.is_dir():
        return None
    for path in sorted(root.rglob("*.json")):
        if path.stat().st_size > max_bytes:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        methods = data.get("methods") if isinstance(data, dict) else None
        if not isinstance(methods, dict):
            continue
        for name, row in methods.items():
            if isinstance(row, dict) and _same_metrics(test, row):
                return path, name, data
    return None


def card_intervals(card: dict, results: str | os.PathLike = RESULTS) -> pd.DataFrame:
    """How sure the card's test numbers are: metric -> value and 95 % bootstrap interval over the test
    crystals, from the ``intervals`` of the results file that ``benchmark_method`` finds for the card
    (``benchmarks/full_pool.py ship`` writes them); an empty frame when there are none."""
    import pandas as pd

    found = benchmark_method(card, results)
    rows = {}
    if found is not None:
        _path, name, data = found
        entry = data.get("intervals", {}).get(name) if isinstance(data.get("intervals"), dict) else None
        for metric, label in INTERVAL_METRICS.items():
            got = entry.get(metric) if isinstance(entry, dict) else None
            numbers = [_number(got.get(k)) for k in ("value", "low", "high")] if isinstance(got, dict) else [None]
            if all(v is not None for v in numbers):
                rows[label] = {"value": _fmt(numbers[0]), "95 % interval": f"{_fmt(numbers[1])} – {_fmt(numbers[2])}"}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["value", "95 % interval"])


def card_plots(card: dict, results: str | os.PathLike = RESULTS) -> list[tuple[Path, str]]:
    """(PNG, caption) of the calibration, parity and sparsification plots that the results file of
    ``benchmark_method`` lists for that method and that exist; ``[]`` when there are none."""
    found = benchmark_method(card, results)
    if found is None:
        return []
    path, name, data = found
    listed = data.get("plots") if isinstance(data.get("plots"), list) else []
    n = _number(test_metrics(card).get("n"))
    shown = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
    where = f" ({shown}, method {name}" + (f", {n:.0f} test crystals)" if n else ")")
    plots = [(path.parent / "plots" / f"{name}_{kind}.png", text + where) for kind, text in PLOTS.items()
             if f"{name}_{kind}.png" in listed]
    return [(png, caption) for png, caption in plots if png.is_file()]


def benchmark_images(root: str | os.PathLike = REPO / "benchmarks") -> list[Path]:
    """Benchmark plots (PNG/SVG/JPEG) found under ``root``, sorted by path."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg")) if root.is_dir() else []


#: how the app names a backbone family
BACKBONE_NAMES = {"chgnet": "CHGNet", "sevennet": "SevenNet"}


def backbone_label(predictor) -> str:
    """'CHGNet 0.3.0', 'SevenNet 7net-0': the family and checkpoint version of a loaded model."""
    backbone = predictor.card.get("backbone", {})
    name = backbone.get("name", "")
    return " ".join(str(v) for v in (BACKBONE_NAMES.get(name, name), backbone.get("version")) if v)
