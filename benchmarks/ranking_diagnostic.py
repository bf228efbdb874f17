"""What ranks a full-pool model's errors on non-metals? (issue 14, the ranking target)

    python benchmarks/ranking_diagnostic.py balora_full_5ep [--forest-size 10k]

Predicts the validation and test crystals of the full-pool protocol with a finished run
(``runs/full_pool/NAME``, 16 draws), trains the Magpie random forest on the first ``--forest-size``
training crystals, and reports Spearman(|error of the network|, signal) on all crystals and on the
true non-metals for each candidate signal: the network's aleatoric std, the draws' std, their total,
the predicted gap, the atom count, the forest's tree spread, the network-forest disagreement, and a
gradient-boosted error model fitted on the validation crystals' signals (scored on test only). The
forest's own ranking (0.53 on non-metals at full pool) is only worth borrowing if its spread ranks
the network's errors too. Writes ``benchmarks/results/full_pool/ranking_NAME.json``.

It also reports the *calibrated ceiling* of each std: the Spearman(|error|, std) that the same stds
would reach if the errors were exactly Gaussian with those stds (error = std * z, z ~ N(0, 1), mean of
200 draws of z). Even a perfectly calibrated std cannot rank errors better than its own spread
allows; a target above the ceiling needs a sharper std (one that varies more between crystals),
not a better calibrated one. ``NAME`` may also be a model folder (e.g. ``models/balora``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import RESULTS, RUNS, SIZES, eval_data, forest_predict, magpie_forest, pool_labels  # noqa: E402
from full_pool_data import full_pool, open_store  # noqa: E402
from mp_gap_data import MagpieFeatures  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.predict import Predictor  # noqa: E402

#: a predicted gap below this (eV) counts as "predicted metal"
METAL_CUT = 0.1


def network_signals(name: str) -> dict:
    """Per part ("val", "test"): targets, predicted mean gap and the candidate signals of run ``name``."""
    predictor = Predictor.load(Path(name) if Path(name).is_dir() else RUNS / name)
    model = predictor.model  # the store of its backbone, entering its first adapted block
    data = eval_data(open_store(allow_missing=True, backbone=model.backbone_name, block=model.family.prefix_block(model.backbone, model.method)))
    out = {}
    for part, idx in (("val", data.split.val), ("test", data.split.test)):
        draws = predictor.sample(data.part(part), samples=16, seed=0)
        gaps = np.clip(draws.gaps, 0.0, None)
        alea = np.sqrt(np.asarray(draws.aleatoric_var)) if draws.aleatoric_var is not None else np.zeros(gaps.shape[1])
        out[part] = {"y": data.targets[idx], "mean": gaps.mean(0), "ids": [data.ids[i] for i in idx],
                     "aleatoric std": alea, "draws std": gaps.std(0), "total std": np.sqrt(gaps.var(0) + alea**2),
                     "predicted gap": gaps.mean(0), "atoms": np.array([data.n_atoms[i] for i in idx], float)}
    return out


def forest_signals(size: str, parts: dict) -> None:
    """Adds the Magpie forest's tree spread, its mean and the disagreement to each part of ``parts``."""
    gap, formula = pool_labels()
    magpie = MagpieFeatures()
    train = full_pool().train_subset(SIZES[size])
    rf = magpie_forest(magpie([formula[s] for s in train]), [gap[s] for s in train])
    for p in parts.values():
        p["forest mean"], p["forest tree std"] = forest_predict(rf, magpie([formula[s] for s in p["ids"]]))
        p["|network - forest|"] = np.abs(p["mean"] - p["forest mean"])


SIGNALS = ("aleatoric std", "draws std", "total std", "predicted gap", "atoms", "forest tree std", "|network - forest|")


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(spearmanr(a, b)[0]), 3)


def calibrated_ceiling(std: np.ndarray, reps: int = 200, seed: int = 0) -> float:
    """Mean Spearman(|std * z|, std) over ``reps`` draws of z ~ N(0, 1): the ranking these stds give
    when they are exactly right."""
    rng = np.random.default_rng(seed)
    return round(float(np.mean([spearmanr(np.abs(std * rng.standard_normal(std.shape)), std)[0] for _ in range(reps)])), 3)


def error_model(parts: dict) -> np.ndarray:
    """A gradient-boosted regressor of log |error| on the signals, fitted on validation; test predictions."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x = lambda p: np.column_stack([p[k] for k in SIGNALS] + [p["forest mean"]])  # noqa: E731
    val = parts["val"]
    model = HistGradientBoostingRegressor(max_depth=3, learning_rate=0.05, max_iter=200, random_state=0)
    model.fit(x(val), np.log(np.abs(val["mean"] - val["y"]) + 1e-3))
    return model.predict(x(parts["test"]))


def diagnose(name: str, forest_size: str) -> dict:
    torch.set_num_threads(1)
    parts = network_signals(name)
    forest_signals(forest_size, parts)
    parts["test"]["error model (fit on val)"] = error_model(parts)
    report = {"run": name, "forest_size": forest_size, "draws": 16, "metal_cut_eV": METAL_CUT, "parts": {}}
    for part, p in parts.items():
        err, nm = np.abs(p["mean"] - p["y"]), p["y"] > 0
        keys = [k for k in (*SIGNALS, "error model (fit on val)") if k in p]
        missed = nm & (p["mean"] < METAL_CUT)
        report["parts"][part] = {
            "n": int(len(err)), "n_nonmetal": int(nm.sum()),
            "spearman_all": {k: _rho(err, p[k]) for k in keys},
            "spearman_nonmetal": {k: _rho(err[nm], p[k][nm]) for k in keys},
            "spearman_nonmetal_network_vs_forest_error": _rho(err[nm], np.abs(p["forest mean"] - p["y"])[nm]),
            "calibrated_ceiling_all": {k: calibrated_ceiling(p[k]) for k in ("total std", "aleatoric std", "forest tree std")},
            "calibrated_ceiling_nonmetal": {k: calibrated_ceiling(p[k][nm]) for k in ("total std", "aleatoric std", "forest tree std")},
            "forest_own_error_spearman": {"all": _rho(np.abs(p["forest mean"] - p["y"]), p["forest tree std"]),
                                          "nonmetal": _rho(np.abs(p["forest mean"] - p["y"])[nm], p["forest tree std"][nm])},
            "nonmetals_predicted_metal": round(float(missed.sum() / nm.sum()), 3),
            "their_share_of_nonmetal_abs_error": round(float(err[missed].sum() / err[nm].sum()), 3),
        }
    write_json(RESULTS / f"ranking_{name.strip('/').replace('/', '_')}.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished run in runs/full_pool, or a model folder (models/balora)")
    ap.add_argument("--forest-size", choices=sorted(SIZES), default="10k")
    args = ap.parse_args(argv)
    report = diagnose(args.run, args.forest_size)
    print(f"| signal | {' | '.join(f'{part} all / non-metals' for part in report['parts'])} |")
    print("|---|" + "---|" * len(report["parts"]))
    for k in (*SIGNALS, "error model (fit on val)"):
        cells = [f"{r['spearman_all'][k]:.3f} / {r['spearman_nonmetal'][k]:.3f}" if k in r["spearman_all"] else "–" for r in report["parts"].values()]
        print(f"| {k} | {' | '.join(cells)} |")
    for part, r in report["parts"].items():
        print(f"{part}: non-metals predicted metal {r['nonmetals_predicted_metal']:.3f} (share of their abs error "
              f"{r['their_share_of_nonmetal_abs_error']:.3f}); Spearman(network error, forest error) on non-metals "
              f"{r['spearman_nonmetal_network_vs_forest_error']:.3f}")
        print(f"{part}: calibrated ceiling all {r['calibrated_ceiling_all']}, non-metals {r['calibrated_ceiling_nonmetal']}; "
              f"the forest's spread on its own errors {r['forest_own_error_spearman']}")


if __name__ == "__main__":
    main()
