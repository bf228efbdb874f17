"""What a user screening by confidence gets: the MAE of the crystals a model is most sure of.

For each full-pool run (or its shipped copy), and with ``--ensemble`` the shipped ensemble: the validation and test
crystals, all and non-metals (PBE gap > 0) apart, ranked by the model's recalibrated ``std``; the
MAE (eV) of the most certain 100 / 75 / 50 / 25 / 10 % (``matbalora.metrics.sparsification_curves``,
unnormalised). Spearman ranks errors within one model; this compares what models leave a user who
keeps only their confident predictions. BaLoRA: 16 draws, seed 0.

    python benchmarks/retention.py balora_full_2blocks_10ep_head512x3_var5_full balora_full_2blocks_10ep_var5_full
    python benchmarks/retention.py --ensemble          # the shipped ensemble alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import REPO, RESULTS, eval_data, finished_run, open_store, shared_store  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.metrics import sparsification_curves  # noqa: E402
from matbalora.predict import EnsemblePredictor, Predictor  # noqa: E402

KEPT = (1.0, 0.75, 0.5, 0.25, 0.1)


def kept_mae(pred: np.ndarray, std: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MAE (eV) of the ``KEPT`` fractions with the smallest std."""
    fractions, curve, _ = sparsification_curves(pred, std, y, num_fractions=100, normalise=False)
    return {f"{k:g}": float(np.interp(1.0 - k, fractions, curve)) for k in KEPT}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="full_pool.py run names (runs/full_pool/NAME or its shipped copy)")
    parser.add_argument("--ensemble", action="store_true", help="the shipped LoRA ensemble too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.runs and not args.ensemble:
        parser.error("name at least one run, or --ensemble")
    import torch

    torch.set_num_threads(args.threads)
    data = eval_data(open_store(allow_missing=True, **shared_store(args.runs, args.ensemble, script="retention.py")))
    predictors = {}
    for name in args.runs:
        folder = finished_run(name)
        if folder is None:
            raise SystemExit(f"retention.py: no finished run {name}")
        predictors[name] = Predictor.load(folder)
    if args.ensemble:
        predictors["shipped_lora_ensemble"] = EnsemblePredictor.load(REPO / "models" / "lora_ensemble")
    # runs measured before (perhaps on another machine: runs/ is not in git) keep their committed rows
    earlier = json.loads((RESULTS / "retention.json").read_text()) if (RESULTS / "retention.json").is_file() else {}
    out: dict = {"kept_fractions": list(KEPT), "runs": {k: v for k, v in earlier.get("runs", {}).items() if k not in predictors}}
    for name, predictor in predictors.items():
        out["runs"][name] = {}
        for part in ("val", "test"):
            y = data.targets[getattr(data.split, part)]
            frame = predictor.predict_prepared(data.part(part), samples=16, seed=0)
            pred, std = frame["band_gap"].to_numpy(), frame["std"].to_numpy()
            nm = y > 0
            out["runs"][name][part] = {"all": kept_mae(pred, std, y), "nonmetal": kept_mae(pred[nm], std[nm], y[nm])}
            print(name, part, out["runs"][name][part], flush=True)
            write_json(RESULTS / "retention.json", out)  # after each part: a killed run keeps what it measured
    return out


if __name__ == "__main__":
    main()
