"""How sure are the headline numbers themselves? Bootstrap intervals over the 1,000 test crystals.

The targets of issue 14 are point values on one test set of 1,000 crystals (MAE, Spearman of |error|
against std on all crystals and on non-metals, coverage of the shipped intervals). This script gives
each a 95 % bootstrap interval over the test crystals (``matbalora.metrics.bootstrap_intervals``:
percentile, paired: a resample keeps each crystal's predictions by every run and its PBE gap
together), and for every run after the first, the interval of its *difference* from the first run on
the same resamples: a difference whose interval holds 0 is not one the test set can tell apart.

Predictions are those of the model card (``predict_prepared``: 16 draws, seed 0; the card's
recalibrated std and Mondrian intervals), kept in ``runs/full_pool/.testpred_<run>_<stamp>.npz`` (a second
call scores without predicting again; the stamp is the model's content key,
``matbalora.screening.model_fingerprint``, so a re-made or re-shipped model is predicted afresh).

    python benchmarks/metric_intervals.py balora_full_2blocks_10ep_head512x3cens_drawn16kx2_heads5_var5_full \\
        balora_full_2blocks_10ep_head512x3cens_drawn16kx2_var5_full \\
        balora_full_2blocks_10ep_head512x3cens_drawn16kx2_heads5boot_var5_full --ensemble --threads 2

Results: ``benchmarks/results/full_pool/metric_intervals.json`` (BENCHMARKS.md section 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import REPO, RESULTS, RUNS, eval_data, finished_run, open_store, shared_store  # noqa: E402

from matbalora.atomic import atomic_write, write_json  # noqa: E402
from matbalora.metrics import HEADLINE, bootstrap_intervals  # noqa: E402
from matbalora.metrics import nll as gaussian_nll  # noqa: E402

ENSEMBLE = "shipped_lora_ensemble"
COLUMNS = ("band_gap", "std", "lower", "upper")


def card_test_predictions(name: str, data, threads: int) -> dict[str, np.ndarray]:
    """The card's predictions of the test crystals (kept in runs/full_pool/.testpred_<name>_<stamp>.npz)."""
    from matbalora.screening import ensemble_fingerprint, model_fingerprint

    folder = REPO / "models" / "lora_ensemble" if name == ENSEMBLE else finished_run(name)
    if folder is None:
        raise SystemExit(f"metric_intervals.py: no finished run {name}")
    stamp = ensemble_fingerprint(folder) if name == ENSEMBLE else model_fingerprint(folder)
    path = RUNS / f".testpred_{name}_{stamp}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return {c: saved[c] for c in COLUMNS}
    import torch

    from matbalora.predict import EnsemblePredictor, Predictor

    torch.set_num_threads(threads)
    predictor = EnsemblePredictor.load(folder) if name == ENSEMBLE else Predictor.load(folder)
    frame = predictor.predict_prepared(data.part("test"), samples=16, seed=0)
    cols = {c: frame[c].to_numpy(dtype=float) for c in COLUMNS}

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **cols)

    atomic_write(path, save, durable=False)
    return cols


def worst_nll(cols: dict[str, np.ndarray], y: np.ndarray, k: int = 8) -> dict:
    """Where a model's Gaussian NLL comes from: its mean, the mean without its ``k`` worst crystals, and
    those crystals (PBE gap, predicted gap, std, NLL), worst first."""
    mean, std = cols["band_gap"], cols["std"]
    nll = np.array([gaussian_nll([m], [s], [t]) for m, s, t in zip(mean, std, y)])  # per crystal, as the cards' NLL (std floor included)
    worst = np.argsort(-nll)[:k]
    return {"mean": round(float(nll.mean()), 4), f"mean_without_{k}_worst": round(float(np.delete(nll, worst).mean()), 4),
            "worst": [{"pbe": round(float(y[i]), 3), "band_gap": round(float(mean[i]), 3), "std": round(float(std[i]), 4),
                       "nll": round(float(nll[i]), 1)} for i in worst]}


def markdown(table) -> str:
    """One row per model (then per difference from the first): value [low, high] of each metric."""
    rows = ["| model | MAE (eV) | Spearman all | Spearman non-metals | coverage |", "|---|---|---|---|---|"]
    for model, group in table.groupby("model", sort=False):
        cells = {r.metric: f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]" for r in group.itertuples()}
        rows.append(f"| {model} | " + " | ".join(cells[m] for m in HEADLINE) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="full_pool.py run names (runs/full_pool/NAME or its shipped copy); differences are from the first")
    parser.add_argument("--ensemble", action="store_true", help="the shipped LoRA ensemble too")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    data = eval_data(open_store(allow_missing=True, **shared_store(args.runs, args.ensemble, script="metric_intervals.py")))
    y = data.targets[data.split.test].astype(float)
    names = [*args.runs, *([ENSEMBLE] if args.ensemble else [])]
    runs = {}
    for name in names:
        runs[name] = card_test_predictions(name, data, args.threads)
        print(f"{name}: predicted", flush=True)
    table = bootstrap_intervals(runs, y, resamples=args.resamples)
    out = {"command": "python benchmarks/metric_intervals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "test_crystals": int(len(y)), "resamples": args.resamples, "confidence": 0.95,
           "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table.to_dict("records")],
           "markdown": markdown(table), "nll": {name: worst_nll(cols, y) for name, cols in runs.items()}}
    write_json(RESULTS / "metric_intervals.json", out)
    print(out["markdown"])
    return out


if __name__ == "__main__":
    main()
