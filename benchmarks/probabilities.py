"""Are p_metal and p_window calibrated? Reliability diagram and Brier score on the full-pool test
crystals, for the shipped models (models/balora, models/lora_ensemble) and a Magpie random forest
whose trees are its members (the same predictive mixture: each tree widened by the forest's std
recalibrated on validation, see matbalora.probabilities).

Events: a metal is a true gap <= METAL_THRESHOLD eV; the window event is lo <= true gap <= hi.

    python benchmarks/probabilities.py --limit 20 --forest-train 500 --out /tmp/prob   # a quick check
    python benchmarks/probabilities.py                                                 # every test crystal
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool_data import MAX_ATOMS, full_pool, raw_frames  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.calibration import StdScaler, fit_recalibration  # noqa: E402
from matbalora.data.entries import build_dataset  # noqa: E402
from matbalora.data.extxyz import parse_frame  # noqa: E402
from matbalora.data.formats import atoms_entry  # noqa: E402
from matbalora.probabilities import METAL_THRESHOLD, p_metal, p_window  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "probabilities"
N_BINS = 10


def brier(p: np.ndarray, event: np.ndarray) -> float:
    """Mean squared difference between a probability and the 0/1 outcome (0 is perfect)."""
    return float(np.mean((p - event) ** 2))


def reliability(p: np.ndarray, event: np.ndarray, bins: int = N_BINS) -> dict:
    """Per equal-width bin of p: its crystals, their mean p and the observed frequency of the event."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows = [(int(np.sum(which == b)), float(p[which == b].mean()), float(event[which == b].mean())) for b in range(bins) if np.any(which == b)]
    return {"n": [r[0] for r in rows], "mean_p": [r[1] for r in rows], "observed": [r[2] for r in rows]}


def scores(p: np.ndarray, event: np.ndarray) -> dict:
    base = float(event.mean())
    return {"brier": brier(p, event), "brier_of_base_rate": brier(np.full_like(p, base), event), "base_rate": base,
            "mean_p": float(p.mean()), "reliability": reliability(p, event)}


def crystals(ids: list[str]):
    """Structures, true gaps and ids of ``ids`` from the shared data (crystals the data layer rejects are left out)."""
    frames, all_ids, _ = raw_frames()
    where = {sid: i for i, sid in enumerate(all_ids)}
    entries = (atoms_entry(parse_frame(frames[where[s]]), s, target_key="band_gap", max_atoms=MAX_ATOMS) for s in ids)
    ds = build_dataset(entries, provenance={"source": "shared/data/mp_gap"})
    return ds.structures, np.asarray(ds.targets, dtype=float), list(ds.ids)


def shipped(structures, window: tuple[float, float], samples: int) -> dict:
    import matbalora

    out = {}
    for name, predictor, kw in (("balora", matbalora.load_model(), {"samples": samples}), ("lora_ensemble", matbalora.load_ensemble(), {})):
        t0 = time.perf_counter()
        frame = predictor.predict(structures, window=window, **kw)
        out[name] = {"p_metal": frame["p_metal"].to_numpy(), "p_window": frame["p_window"].to_numpy(), "seconds": time.perf_counter() - t0}
    return out


def forest(pool, test_ids: list[str], window: tuple[float, float], n_train: int, n_val: int) -> dict:
    """Magpie features + 100 trees (as benchmarks/mp_gap_evaluate.py), std recalibrated on validation."""
    import re

    from sklearn.ensemble import RandomForestRegressor

    frames, all_ids, _ = raw_frames()
    where = {sid: i for i, sid in enumerate(all_ids)}

    def rows(ids):
        comments = [frames[where[s]].comment for s in ids]
        return [re.search(r"formula=(\S+)", c).group(1) for c in comments], np.array([float(re.search(r"band_gap=(\S+)", c).group(1)) for c in comments])

    from mp_gap_data import MagpieFeatures

    features = MagpieFeatures()

    (f_tr, y_tr), (f_val, y_val), (f_te, _) = rows(pool.train_subset(n_train)), rows(pool.val[:n_val]), rows(test_ids)
    t0 = time.perf_counter()
    rf = RandomForestRegressor(n_estimators=100, n_jobs=1, random_state=0).fit(features(f_tr), y_tr)

    def trees(formulas):
        t = np.stack([e.predict(features(formulas)) for e in rf.estimators_])  # [100, n]
        return t, np.maximum(t.std(0, ddof=1), 1e-6)

    t_val, s_val = trees(f_val)
    scaler = StdScaler.from_calibration(fit_recalibration(t_val.mean(0), s_val, y_val))
    t_te, s_te = trees(f_te)
    std = scaler.transform(s_te)
    return {"p_metal": p_metal(t_te, std), "p_window": p_window(t_te, std, window), "seconds": time.perf_counter() - t0,
            "n_train": len(y_tr), "n_val": len(y_val), "std_scale": scaler.factor, "std_floor": scaler.floor}


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matbalora.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    lo, hi = results["window"]
    for ax, event, title in zip(axes, ("p_metal", "p_window"), (f"P(metal) (gap <= {METAL_THRESHOLD:g} eV)", f"P({lo:g} eV <= gap <= {hi:g} eV)")):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
        for name, row in results["methods"].items():
            r = row[event]["reliability"]
            ax.plot(r["mean_p"], r["observed"], marker="o", label=f"{name} (Brier {row[event]['brier']:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability (bin mean)", ylabel="observed frequency", title=title)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Reliability on {results['n_test']} full-pool test crystals")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, nargs=2, default=(1.0, 2.0), metavar=("LO", "HI"), help="the target window, eV")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test crystals (a quick check)")
    parser.add_argument("--samples", type=int, default=16, help="BaLoRA Monte-Carlo draws")
    parser.add_argument("--forest-train", type=int, default=None, help="training crystals of the forest (default: the whole pool, as the shipped models)")
    parser.add_argument("--forest-val", type=int, default=1000, help="validation crystals the forest's std is recalibrated on")
    parser.add_argument("--out", default=str(RESULTS), help="folder for results.json and reliability.png")
    args = parser.parse_args(argv)
    window = (float(args.window[0]), float(args.window[1]))
    pool = full_pool()
    structures, y, ids = crystals(pool.test[: args.limit] if args.limit else pool.test)
    events = {"p_metal": (y <= METAL_THRESHOLD).astype(float), "p_window": ((y >= window[0]) & (y <= window[1])).astype(float)}
    preds = shipped(structures, window, args.samples) | {"magpie_forest": forest(pool, ids, window, args.forest_train, args.forest_val)}
    results = {"window": list(window), "metal_threshold": METAL_THRESHOLD, "n_test": len(y), "limit": args.limit, "samples": args.samples,
               "command": "python benchmarks/probabilities.py " + " ".join(argv if argv is not None else sys.argv[1:]), "methods": {}}
    for name, pred in preds.items():
        results["methods"][name] = {k: scores(pred[k], events[k]) for k in events} | {k: v for k, v in pred.items() if k not in events}
        print(name, json.dumps({k: round(results["methods"][name][k]["brier"], 4) for k in events}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    print(f"wrote {out / 'results.json'} and {plot(results, out / 'reliability.png')}")
    return results


if __name__ == "__main__":
    main()
