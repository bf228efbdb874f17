"""Evaluation stage of benchmarks/mp_gap.py: every method on the same test crystals."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from mp_gap import ENSEMBLE_SEEDS, METHODS, RESULTS, RUNS, SIZES, command
from mp_gap_data import load_benchmark_data

from matbalora.atomic import write_json
from matbalora.calibration import ConformalIntervals, StdScaler
from matbalora.evaluation import plot_all, score_frame
from matbalora.model import BandGapModel
from matbalora.plots import save_figure
from matbalora.predict import Predictor

S_SWEEP = [1, 2, 4, 8, 16, 32, 64]
MAIN_SAMPLES = 16


def _frame(mean: np.ndarray, std: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"band_gap": mean, "std": std})


def _summary(scored: dict) -> dict:
    """Flat summary row: calibrated metrics + coverage before/after recalibration."""
    cal = scored.get("calibrated", {})
    row = {k: cal.get(k) for k in ("mae", "rmse", "r2", "spearman", "nll", "miscalibration_area", "ence", "coverage_68", "coverage_90", "coverage_95", "mean_interval_width_90", "auc_sparsification_error")}
    row.update({f"nonmetal_{k}": cal.get(f"nonmetal_{k}") for k in ("mae", "spearman", "nll", "coverage_90", "miscalibration_area")})
    if "uncalibrated" in scored:
        row["coverage_90_uncalibrated"] = scored["uncalibrated"].get("coverage_90")
        row["nll_uncalibrated"] = scored["uncalibrated"].get("nll")
    if "conformal" in scored:
        row["coverage_90_conformal"] = scored["conformal"]["coverage"]
    return row


def _card_facts(folder) -> dict:
    card = json.loads((folder / "config.json").read_text())
    tr = card["training"]
    return {"train_seconds": tr["train_seconds"], "trainable_params": tr["parameters"]["trainable"], "trainable_share": tr["parameters"]["trainable"] / tr["parameters"]["total"], "epochs": tr["epochs_run"], "best_val_mae": tr["best_val_mae"]}


def _timed_draws(pred: Predictor, prep, samples: int):
    t0 = time.perf_counter()
    draws = pred.sample(prep, samples=samples, seed=0)
    return draws, (time.perf_counter() - t0) * 1000 / max(1, len(prep.graphs))


def evaluate_single(name: str, test, y: np.ndarray, out: dict) -> Predictor:
    pred = Predictor.load(RUNS / name)
    stochastic = pred.model.is_bayesian or pred.model.has_dropout
    n_draws = (max(S_SWEEP) if name == "balora" else MAIN_SAMPLES) if stochastic else 0
    draws, ms = _timed_draws(pred, test, n_draws)
    g = draws.gaps
    main = g[:MAIN_SAMPLES] if stochastic else g
    std = main.std(0, ddof=1) * pred.std_scale if stochastic else np.full(g.shape[1], np.nan)
    scored = score_frame(_frame(main.mean(0), std), y, std_scale=pred.std_scale, conformal=(pred.config.get("calibration") or {}).get("conformal"))
    row = _summary(scored) | _card_facts(RUNS / name)
    row["predict_ms_per_structure"] = ms * (MAIN_SAMPLES / n_draws if n_draws > MAIN_SAMPLES else 1.0)
    row["samples"] = MAIN_SAMPLES if stochastic else 0
    out["methods"][name] = row
    out["details"][name] = scored
    if name == "balora":
        sweep_sp, sweep_nll, sweep_mae = {}, {}, {}
        from matbalora.metrics import mae, nll, spearman

        for s in S_SWEEP:
            m = g[:s].mean(0)
            sd = g[:s].std(0, ddof=1) * pred.std_scale if s > 1 else np.zeros_like(m)
            sweep_mae[str(s)] = mae(m, sd, y)
            sweep_sp[str(s)] = spearman(m, sd, y) if s > 1 else float("nan")
            sweep_nll[str(s)] = nll(m, sd, y) if s > 1 else float("nan")
        out["spearman_vs_samples"], out["nll_vs_samples"], out["mae_vs_samples"] = sweep_sp, sweep_nll, sweep_mae
        out["plots"] += [p.name for p in plot_all(_frame(main.mean(0), std), y, RESULTS / "plots", "balora")]
    return pred


def evaluate_ensemble(data, test, y: np.ndarray, out: dict) -> None:
    from matbalora.metrics import mae, nll, spearman

    members = [Predictor.load(RUNS / f"lora_seed{s}") for s in ENSEMBLE_SEEDS]
    val = data.part("val")
    y_val = data.targets[data.split.val]
    val_g = np.stack([m.sample(val, samples=0).gaps[0] for m in members])
    t0 = time.perf_counter()
    test_g = np.stack([m.sample(test, samples=0).gaps[0] for m in members])
    ms = (time.perf_counter() - t0) * 1000 / len(test.graphs)
    scale = StdScaler().fit(val_g.mean(0), val_g.std(0, ddof=1), y_val).factor
    conformal = ConformalIntervals().fit(val_g.mean(0), val_g.std(0, ddof=1), y_val, 0.9).to_dict()
    out["ensemble_calibration"] = {"std_scale": scale, "conformal": conformal, "fitted_on": "val", "samples": 0}
    mean, std = test_g.mean(0), test_g.std(0, ddof=1) * scale
    scored = score_frame(_frame(mean, std), y, std_scale=scale, conformal=conformal)
    facts = [_card_facts(RUNS / f"lora_seed{s}") for s in ENSEMBLE_SEEDS]
    row = _summary(scored) | {"train_seconds": sum(f["train_seconds"] for f in facts), "trainable_params": sum(f["trainable_params"] for f in facts), "predict_ms_per_structure": ms, "members": len(members)}
    out["methods"]["lora_ensemble"] = row
    out["details"]["lora_ensemble"] = scored
    out["spearman_vs_members"], out["nll_vs_members"], out["mae_vs_members"] = {}, {}, {}
    for k in range(1, len(members) + 1):
        m = test_g[:k].mean(0)
        sd = test_g[:k].std(0, ddof=1) * scale if k > 1 else np.zeros_like(m)
        out["mae_vs_members"][str(k)] = mae(m, sd, y)
        out["spearman_vs_members"][str(k)] = spearman(m, sd, y) if k > 1 else float("nan")
        out["nll_vs_members"][str(k)] = nll(m, sd, y) if k > 1 else float("nan")
    out["plots"] += [p.name for p in plot_all(_frame(mean, std), y, RESULTS / "plots", "lora_ensemble")]


def evaluate_composition_baseline(data, y: np.ndarray, out: dict) -> None:
    """Magpie composition features + a 100-tree random forest; std = spread of the trees."""
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition
    from sklearn.ensemble import RandomForestRegressor

    feat = ElementProperty.from_preset("magpie")
    t0 = time.perf_counter()

    def features(idx):
        return np.array([feat.featurize(Composition(data.formulas[i])) for i in idx], dtype=float)

    X_tr, X_val, X_te = features(data.split.train), features(data.split.val), features(data.split.test)
    rf = RandomForestRegressor(n_estimators=100, n_jobs=2, random_state=0, min_samples_leaf=1)
    rf.fit(np.nan_to_num(X_tr), data.targets[data.split.train])
    train_s = time.perf_counter() - t0

    def predict(X):
        trees = np.stack([t.predict(np.nan_to_num(X)) for t in rf.estimators_])
        return trees.mean(0), trees.std(0, ddof=1)

    vm, vs = predict(X_val)
    scale = StdScaler().fit(vm, np.maximum(vs, 1e-6), data.targets[data.split.val]).factor
    conformal = ConformalIntervals().fit(vm, np.maximum(vs, 1e-6), data.targets[data.split.val], 0.9).to_dict()
    t0 = time.perf_counter()
    mean, std = predict(X_te)
    ms = (time.perf_counter() - t0) * 1000 / len(y)
    scored = score_frame(_frame(mean, np.maximum(std, 1e-6) * scale), y, std_scale=scale, conformal=conformal)
    out["methods"]["composition_baseline"] = _summary(scored) | {"train_seconds": train_s, "predict_ms_per_structure": ms, "trainable_params": None, "model": "matminer Magpie + RandomForest(100)"}
    out["details"]["composition_baseline"] = scored


def sweep_plot(out: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    s = [int(k) for k, v in out["spearman_vs_samples"].items() if np.isfinite(v)]
    ax.plot(s, [out["spearman_vs_samples"][str(k)] for k in s], "o-", label="BaLoRA, S samples")
    k = [int(k) for k, v in out["spearman_vs_members"].items() if np.isfinite(v)]
    ax.plot(k, [out["spearman_vs_members"][str(j)] for j in k], "s-", label="LoRA ensemble, K members")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forward passes per crystal (S or K)")
    ax.set_ylabel("Spearman(|error|, std)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, RESULTS / "plots" / "spearman_vs_compute.png")
    out["plots"].append("spearman_vs_compute.png")


def stage_evaluate() -> None:
    probe = BandGapModel.from_pretrained("head")
    data = load_benchmark_data(SIZES, probe, progress=False)
    test = data.part("test")
    y = data.targets[data.split.test]
    out = {
        "command": command("evaluate"),
        "n_train": len(data.split.train), "n_val": len(data.split.val), "n_test": len(data.split.test),
        "test_metal_fraction": float(np.mean(y == 0)),
        "data": {**{k: v for k, v in data.provenance.items() if k != "rejected"}, "rejected": data.provenance["rejected"]},
        "protocol": "test = seeded subset of Matbench fold-0 test entries; train/val = seeded subsets of the other folds; "
                    "all methods share the split; recalibration (std scaling, conformal) fitted on val only",
        "methods": {}, "details": {}, "plots": [],
    }
    for name in METHODS:
        if name.startswith("lora_seed") and name != "lora_seed0":
            continue
        if (RUNS / name / "config.json").is_file():
            evaluate_single(name, test, y, out)
            print(name, out["methods"][name]["mae"], out["methods"][name].get("spearman"), flush=True)
    out["methods"]["lora"] = out["methods"].pop("lora_seed0")
    out["details"]["lora"] = out["details"].pop("lora_seed0")
    evaluate_ensemble(data, test, y, out)
    evaluate_composition_baseline(data, y, out)
    sweep_plot(out)
    write_json(RESULTS / "mp_gap.json", out)
    print(json.dumps({k: {m: v.get(m) for m in ("mae", "spearman", "nll", "coverage_90")} for k, v in out["methods"].items()}, indent=1))
