"""How far do the interval bounds move between two seeds, at S = 8, 16, 32, 64 draws? (issue 15 item 2)

For the shipped BaLoRA model on the full-pool test crystals: each crystal is predicted with seed 0
and seed 1 at each S (draws keyed by the crystal, so the two runs differ only by Monte-Carlo noise);
a bound "moves" by |bound(seed 0) - bound(seed 1)|, the larger of the lower and upper bound's moves.
The default S is the smallest with a move below 0.05 eV for 90 % of the crystals.

    python benchmarks/interval_stability.py --limit 20 --out /tmp/stab   # a quick check
    python benchmarks/interval_stability.py                              # every test crystal
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool_data import full_pool  # noqa: E402
from probabilities import crystals  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.defaults import LEVEL, SAMPLES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "interval_stability"
DRAWS = (8, 16, 32, 64)
TOLERANCE = 0.05  # eV
SHARE = 0.90


def moves(model, prep, samples: int) -> dict:
    """Per crystal: the larger bound move between seeds 0 and 1, and the std's relative change."""
    from matbalora.predict import summarize

    t0 = time.perf_counter()
    runs = [summarize(model.gap_draws(prep, samples=samples, seed=seed), model.scaler, model.mondrian, LEVEL) for seed in (0, 1)]
    seconds = (time.perf_counter() - t0) / 2
    move = np.maximum(np.abs(runs[0]["lower"] - runs[1]["lower"]), np.abs(runs[0]["upper"] - runs[1]["upper"]))
    std_change = np.abs(runs[0]["std"] - runs[1]["std"]) / np.maximum(runs[0]["std"], 1e-9)
    return {"samples": samples, "share_below_tolerance": float(np.mean(move < TOLERANCE)), "median_move": float(np.median(move)),
            "p90_move": float(np.quantile(move, 0.9)), "max_move": float(move.max()), "median_relative_std_change": float(np.median(std_change)),
            "seconds_per_crystal": seconds / len(move), "mean_width": float(np.mean(runs[0]["upper"] - runs[0]["lower"]))}


def main(argv: list[str] | None = None) -> dict:
    import matbalora
    from matbalora.predict import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test crystals (a quick check)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for results.json")
    args = parser.parse_args(argv)
    structures, _, ids = crystals(full_pool().test[: args.limit] if args.limit else full_pool().test)
    model = matbalora.load_model()
    prep = prepare(model.model, structures, ids)
    rows = []
    for samples in DRAWS:
        rows.append(moves(model, prep, samples))
        print(json.dumps(rows[-1]), flush=True)
    passing = [r["samples"] for r in rows if r["share_below_tolerance"] >= SHARE]
    results = {"model": "models/balora", "n_test": len(ids), "level": LEVEL, "tolerance_eV": TOLERANCE, "share": SHARE, "default_samples": SAMPLES,
               "smallest_passing_samples": passing[0] if passing else None, "rows": rows,
               "command": "python benchmarks/interval_stability.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
