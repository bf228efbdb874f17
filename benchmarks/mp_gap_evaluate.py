"""Evaluation stage of benchmarks/mp_gap.py: every method on the same test crystals."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from mp_gap import ENSEMBLE_SEEDS, LARGE_BASELINE_TRAIN, METHODS, RESULTS, RESULTS_FILE, RUNS, SHIPPED, SIZES, command, epochs_of
from mp_gap_data import composition_rows, load_benchmark_data

from matbalora.atomic import write_json
from matbalora.calibration import StdScaler, fit_recalibration
from matbalora.evaluation import plot_all, score_frame
from matbalora.finetune import with_frozen_prefix
from matbalora.model import BandGapModel
from matbalora.plots import save_figure
from matbalora.predict import Predictor

#: test-time samples of the default BaLoRA model (the shipped profile stops at 16: the 64-draw sweep is
#: the benchmark's, and 64 draws on 1,000 crystals took 16 minutes on the shared CPU)
S_SWEEP = [1, 2, 4, 8, 16] if SHIPPED else [1, 2, 4, 8, 16, 32, 64]
S_SWEEP_ALL_BLOCKS = [1, 2, 4, 8, 16]  # adapters in every block: 64 draws on 1,000 crystals took > 40 CPU-minutes
TIMING_CRYSTALS = 100  # prediction time is measured from CrystalGraphs (the whole backbone) on this many
STD_FLOOR = 1e-6  # eV: draws or members that agree exactly (a saturated output) still get a positive std
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


def _head(prep, n: int):
    """The first ``n`` crystals of a Prepared part."""
    return type(prep)(**{**prep.__dict__, **{k: getattr(prep, k)[:n] for k in ("ids", "formulas", "n_atoms", "errors", "graphs")}, "graph_rows": list(range(n))})


def _predict_ms(pred, samples: int) -> float:
    """Milliseconds per structure of a prediction from CrystalGraphs (every block of the backbone runs,
    as it does for a user's structures), on the first ``TIMING_CRYSTALS`` test crystals."""
    sub = _head(_SHARED["test"], TIMING_CRYSTALS)
    t0 = time.perf_counter()
    pred.sample(sub, samples=samples, seed=0)
    return (time.perf_counter() - t0) * 1000 / max(1, len(sub.graphs))


def _test_for(model):
    """The test part with cached frozen-prefix features where the model allows it (same numbers, less work)."""
    return _SHARED["prefixed"].get(test_block(model), _SHARED["data"]).part("test")


def noise_summary(model) -> dict:
    """Where the learned BaLoRA noise ended up: log a per rank component, over all adapted layers,
    and the fraction of components at the clamp ceiling (noise std = sqrt(a) times the mean)."""
    from matbalora.adapters import BaLoRALinear

    layers = [m for m in model.modules() if isinstance(m, BaLoRALinear)]
    log_a = np.concatenate([m.clamped_log_a().detach().cpu().numpy() for m in layers])
    ceiling = layers[0].log_a_range[1]
    return {"layers": len(layers), "log_a_mean": float(log_a.mean()), "log_a_min": float(log_a.min()), "log_a_median": float(np.median(log_a)),
            "log_a_max": float(log_a.max()), "fraction_at_ceiling": float(np.mean(log_a >= ceiling - 1e-6)), "kl_total": float(sum(m.kl().detach() for m in layers))}


NOISE_OFFSETS = [-6.0, -4.0, -2.0, 0.0, 2.0]  # added to every learned log a at test time (clamped at log_a_max)
NOISE_SWEEP_CRYSTALS = 150


def noise_sweep(pred: Predictor, test, y: np.ndarray, main_draws: np.ndarray) -> dict:
    """Diagnostic, not the method: the trained BaLoRA model with every log a raised by an offset at
    test time (noise std times exp(offset / 2)), 16 draws on the first test crystals. Tells whether
    the ranking of errors would improve if training had moved the noise further from its start."""
    import torch

    from matbalora.adapters import BaLoRALinear
    from matbalora.metrics import mae, spearman

    n = min(NOISE_SWEEP_CRYSTALS, len(y))
    sub = _head(test, n)
    layers = [m for m in pred.model.modules() if isinstance(m, BaLoRALinear)]
    result = {"crystals": n, "samples": MAIN_SAMPLES, "offsets": {}}
    nonmetal = y[:n] > 0
    for offset in NOISE_OFFSETS:
        if offset == 0.0:
            g = main_draws[:, :n]
        else:
            with torch.no_grad():
                for m in layers:
                    m.log_a.add_(offset)
            try:
                g = pred.sample(sub, samples=MAIN_SAMPLES, seed=1).gaps
            finally:
                with torch.no_grad():
                    for m in layers:
                        m.log_a.sub_(offset)
        mean, sd = g.mean(0), g.std(0, ddof=1)
        result["offsets"][str(offset)] = {
            "log_a_mean": float(np.mean(np.concatenate([m.clamped_log_a().detach().numpy() for m in layers])) + offset),
            "mae": mae(mean, sd, y[:n]), "spearman": spearman(mean, sd, y[:n]),
            "nonmetal_spearman": spearman(mean[nonmetal], sd[nonmetal], y[:n][nonmetal]), "median_raw_std": float(np.median(sd)),
        }
    return result


def evaluate_single(name: str, y: np.ndarray, out: dict) -> Predictor:
    pred = Predictor.load(RUNS / name)
    test = _test_for(pred.model)
    stochastic = pred.model.is_bayesian or pred.model.has_dropout
    sweep = {"balora": S_SWEEP, "balora_all_blocks": S_SWEEP_ALL_BLOCKS}.get(name)
    n_draws = (max(sweep) if sweep else MAIN_SAMPLES) if stochastic else 0
    g = pred.sample(test, samples=n_draws, seed=0).gaps
    ms = _predict_ms(pred, MAIN_SAMPLES if stochastic else 0)
    main = g[:MAIN_SAMPLES] if stochastic else g
    raw = main.std(0, ddof=1) if stochastic else np.full(g.shape[1], np.nan)
    calibration = pred.config.get("calibration") or {}
    if stochastic and "conformal" not in calibration:  # trained before stochastic non-Bayesian models were recalibrated
        data = _SHARED["prefixed"].get(test_block(pred.model), _SHARED["data"])
        val = pred.sample(data.part("val"), samples=MAIN_SAMPLES, seed=0).gaps
        calibration = fit_recalibration(val.mean(0), np.maximum(val.std(0, ddof=1), STD_FLOOR), data.targets[data.split.val]) | {"fitted_on": "val (at evaluation)"}
        pred.scaler = StdScaler.from_calibration(calibration)
    std = pred.scaler.transform(raw)
    scored = score_frame(_frame(main.mean(0), std), y, raw_std=raw, conformal=calibration.get("conformal"))
    row = _summary(scored) | _card_facts(RUNS / name)
    row["predict_ms_per_structure"] = ms
    row["samples"] = MAIN_SAMPLES if stochastic else 0
    row["std_scale"] = pred.scaler.factor if stochastic else None
    row["std_floor"] = pred.scaler.floor if stochastic else None
    if pred.model.is_bayesian:
        row["noise"] = noise_summary(pred.model)
    out["methods"][name] = row
    out["details"][name] = scored
    if sweep:
        sweep_sp, sweep_nll, sweep_mae = {}, {}, {}
        from matbalora.metrics import mae, nll, spearman

        for s in sweep:
            m = g[:s].mean(0)
            sd = pred.scaler.transform(g[:s].std(0, ddof=1)) if s > 1 else np.zeros_like(m)
            sweep_mae[str(s)] = mae(m, sd, y)
            sweep_sp[str(s)] = spearman(m, sd, y) if s > 1 else float("nan")
            sweep_nll[str(s)] = nll(m, sd, y) if s > 1 else float("nan")
        suffix = name.removeprefix("balora")
        out["spearman_vs_samples" + suffix], out["nll_vs_samples" + suffix], out["mae_vs_samples" + suffix] = sweep_sp, sweep_nll, sweep_mae
        out["plots"] += [p.name for p in plot_all(_frame(main.mean(0), std), y, RESULTS / "plots", name)]
    return pred


def evaluate_ensemble(prefix: str, y: np.ndarray, out: dict) -> None:
    """The K = 5 ensemble of the runs ``{prefix}_seed{s}``, scored as ``lora_ensemble{suffix}``."""
    from matbalora.metrics import mae, nll, spearman

    suffix = prefix.removeprefix("lora")
    members = [Predictor.load(RUNS / f"{prefix}_seed{s}") for s in ENSEMBLE_SEEDS]
    data = _SHARED["prefixed"].get(test_block(members[0].model), _SHARED["data"])
    val, test = data.part("val"), data.part("test")
    y_val = data.targets[data.split.val]
    val_g = np.stack([m.sample(val, samples=0).gaps.mean(0) for m in members])
    test_g = np.stack([m.sample(test, samples=0).gaps.mean(0) for m in members])
    ms = sum(_predict_ms(m, 0) for m in members)
    calibration = fit_recalibration(val_g.mean(0), np.maximum(val_g.std(0, ddof=1), STD_FLOOR), y_val)
    out["ensemble_calibration" + suffix] = calibration | {"fitted_on": "val", "samples": 0}
    scaler = StdScaler.from_calibration(calibration)
    mean, raw = test_g.mean(0), test_g.std(0, ddof=1)
    std = scaler.transform(raw)
    scored = score_frame(_frame(mean, std), y, raw_std=raw, conformal=calibration["conformal"])
    facts = [_card_facts(RUNS / f"{prefix}_seed{s}") for s in ENSEMBLE_SEEDS]
    row = _summary(scored) | {"train_seconds": sum(f["train_seconds"] for f in facts), "trainable_params": sum(f["trainable_params"] for f in facts), "predict_ms_per_structure": ms, "members": len(members), "std_scale": scaler.factor, "std_floor": scaler.floor}
    out["methods"]["lora_ensemble" + suffix] = row
    out["details"]["lora_ensemble" + suffix] = scored
    sweeps = {key: {} for key in ("spearman_vs_members", "nll_vs_members", "mae_vs_members")}
    for k in range(1, len(members) + 1):
        m = test_g[:k].mean(0)
        sd = scaler.transform(test_g[:k].std(0, ddof=1)) if k > 1 else np.zeros_like(m)
        sweeps["mae_vs_members"][str(k)] = mae(m, sd, y)
        sweeps["spearman_vs_members"][str(k)] = spearman(m, sd, y) if k > 1 else float("nan")
        sweeps["nll_vs_members"][str(k)] = nll(m, sd, y) if k > 1 else float("nan")
    out.update({key + suffix: value for key, value in sweeps.items()})
    out["plots"] += [p.name for p in plot_all(_frame(mean, std), y, RESULTS / "plots", "lora_ensemble" + suffix)]


def evaluate_composition_baseline(data, y: np.ndarray, out: dict) -> None:
    """Magpie composition features + a 100-tree random forest; std = spread of the trees. Trained on
    the benchmark's training split (``composition_baseline``) and, for scale, on
    ``LARGE_BASELINE_TRAIN`` crystals of the other folds (``composition_baseline_large``)."""
    from sklearn.ensemble import RandomForestRegressor

    from mp_gap_data import MagpieFeatures

    features = MagpieFeatures()

    y_val = data.targets[data.split.val]
    X_val = features([data.formulas[i] for i in data.split.val])
    X_te = features([data.formulas[i] for i in data.split.test])
    large_formulas, large_y = composition_rows(SIZES, LARGE_BASELINE_TRAIN)
    for name, formulas, targets in (
        ("composition_baseline", [data.formulas[i] for i in data.split.train], data.targets[data.split.train]),
        ("composition_baseline_large", large_formulas, large_y),
    ):
        t0 = time.perf_counter()
        rf = RandomForestRegressor(n_estimators=100, n_jobs=2, random_state=0)
        rf.fit(features(formulas), targets)
        train_s = time.perf_counter() - t0

        def predict(X):
            trees = np.stack([t.predict(X) for t in rf.estimators_])
            return trees.mean(0), np.maximum(trees.std(0, ddof=1), 1e-6)

        vm, vs = predict(X_val)
        calibration = fit_recalibration(vm, vs, y_val)
        t0 = time.perf_counter()
        mean, raw = predict(X_te)
        ms = (time.perf_counter() - t0) * 1000 / len(y)
        scored = score_frame(_frame(mean, StdScaler.from_calibration(calibration).transform(raw)), y, raw_std=raw, conformal=calibration["conformal"])
        out["methods"][name] = _summary(scored) | {
            "train_seconds": train_s, "predict_ms_per_structure": ms, "trainable_params": None,
            "n_train": len(targets), "model": "matminer Magpie + RandomForest(100 trees), std = spread of the trees",
        }
        out["details"][name] = scored
        print(name, out["methods"][name]["mae"], out["methods"][name]["spearman"], flush=True)


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


#: the member scored alone as "lora" (and "lora_all_blocks"): the first trained for as many epochs as its balora
LORA_REFERENCE = {
    prefix: next(f"{prefix}_seed{s}" for s in ENSEMBLE_SEEDS if epochs_of(f"{prefix}_seed{s}") == epochs_of(balora))
    for prefix, balora in (("lora", "balora"), ("lora_all_blocks", "balora_all_blocks"))
}
_SHARED: dict = {}  # data of the evaluation, inherited by the forked workers


def test_block(model) -> int:
    """The block the model's cached features enter at (0: it needs CrystalGraphs)."""
    return model.family.prefix_block(model.backbone, model.method)


def _task(job: tuple[str, str]) -> dict:
    """One evaluation job in a worker: ``("single", name)`` or ``("ensemble", "")``; returns its part of the results."""
    import torch

    torch.set_num_threads(1)
    part: dict = {"methods": {}, "details": {}, "plots": []}
    y = _SHARED["y"]
    t0 = time.perf_counter()
    if job[0] == "noise":
        pred = Predictor.load(RUNS / "balora")
        n = min(NOISE_SWEEP_CRYSTALS, len(y))
        sub = _head(_test_for(pred.model), n)
        part["noise_sweep"] = noise_sweep(pred, sub, y[:n], pred.sample(sub, samples=MAIN_SAMPLES, seed=0).gaps)
    elif job[0] == "single":
        evaluate_single(job[1], y, part)
    else:
        evaluate_ensemble(job[1], y, part)
    print(f"{job[1] or job[0]}: evaluated in {time.perf_counter() - t0:.0f}s", flush=True)
    return part


def stage_evaluate(workers: int = 2) -> None:
    """Score every trained method on the test split; jobs run in ``workers`` forked processes
    (one torch thread each), so per-structure prediction times are measured with the cores shared."""
    import multiprocessing as mp

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
        "evaluation_workers": workers,
        "methods": {}, "details": {}, "plots": [],
    }
    members = {f"{p}_seed{s}" for p in LORA_REFERENCE for s in ENSEMBLE_SEEDS} - set(LORA_REFERENCE.values())
    names = [n for n in METHODS if n not in members and (RUNS / n / "config.json").is_file()]
    ensembles = [p for p in LORA_REFERENCE if all((RUNS / f"{p}_seed{s}" / "config.json").is_file() for s in ENSEMBLE_SEEDS)]
    jobs = [("single", n) for n in names if n.startswith("balora")] + [("ensemble", p) for p in ensembles]
    jobs += [("single", n) for n in names if not n.startswith("balora")] + [("noise", "")] * ("balora" in names)
    last = BandGapModel.from_pretrained("lora")  # the default placement: features cached to its first adapted block
    prefixed = with_frozen_prefix(data, last, parts=("val", "test"), progress=False)
    _SHARED.update(data=data, test=test, y=y, prefixed={test_block(last): prefixed})
    with mp.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        pending = pool.map_async(_task, jobs)
        evaluate_composition_baseline(data, y, out)  # in this process while the workers run
        for part in pending.get():
            for key, value in part.items():
                if key in ("methods", "details"):
                    out[key].update(value)
                elif key == "plots":
                    out["plots"] += value
                else:
                    out[key] = value
    order = [*names, *(f"lora_ensemble{p.removeprefix('lora')}" for p in ensembles), "composition_baseline", "composition_baseline_large"]
    out["methods"] = {n: out["methods"][n] for n in order}  # a stable order
    for prefix, member in LORA_REFERENCE.items():
        if member in out["methods"]:
            out["methods"][prefix] = out["methods"].pop(member) | {"member": member}
            out["details"][prefix] = out["details"].pop(member)
    sweep_plot(out)
    write_json(RESULTS / RESULTS_FILE, out)
    print(json.dumps({k: {m: v.get(m) for m in ("mae", "spearman", "nll", "coverage_90")} for k, v in out["methods"].items()}, indent=1))
