"""Where a gap head cannot learn: training non-metals it predicts as metals, and how deep below zero.

For each full-pool rehead run (or its shipped copy), its gap head on the frozen posterior-mean pooled
features of all 82,111 training crystals (the cache ``runs/full_pool/.pooled_<fingerprint>_82111.pt`` that
``full_pool.py rehead`` leaves, keyed by ``matbalora.finetune.features_fingerprint``: the runs must
share their backbone and adapters, and then one cache serves all): the
pre-activation z of the gap output and the in-sample gap. A training crystal whose PBE gap is above
``--gap`` eV but is predicted below 0.05 eV is a missed non-metal; under a softplus output one with
z < -5 gets an L1 gradient below sigmoid(-5) = 0.0067 of a live crystal's and is stuck there
(``matbalora.head.BandGapHead``, ``output="censored"``).

    # the softplus-head model shipped before (models/balora of commit 0a14a43) into a folder of its run's name
    mkdir -p /tmp/balora_full_2blocks_10ep_head512x3_var5_full
    for f in config.json model.safetensors; do git show 0a14a43:models/balora/$f > /tmp/balora_full_2blocks_10ep_head512x3_var5_full/$f; done
    python benchmarks/dead_zone.py /tmp/balora_full_2blocks_10ep_head512x3_var5_full balora_full_2blocks_10ep_head512x3cens_var5_full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import RESULTS, RUNS, finished_run  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.checkpoint import load_model_folder  # noqa: E402
from matbalora.finetune import features_fingerprint  # noqa: E402


def head_outputs(head, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pre-activation z of the gap, gap) [n] of a BandGapHead on pooled features x [n, d]."""
    with torch.no_grad():
        z = head.gap_preactivation(x)
        return z.numpy(), head(x)["gap"].numpy()


def census(z: np.ndarray, gap: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    nonmetal = y > threshold
    missed = nonmetal & (gap < 0.05)
    return {"nonmetals": int(nonmetal.sum()), "missed_as_metal": int(missed.sum()), "missed_with_z_below_-5": int((missed & (z < -5)).sum()),
            "missed_pbe_gap_mean": float(y[missed].mean()) if missed.any() else None,
            "in_sample_mae_all": float(np.abs(gap - y).mean()), "in_sample_mae_nonmetals": float(np.abs(gap - y)[nonmetal].mean()),
            "metals_with_z_below_-5": int(((y == 0) & (z < -5)).sum()), "metals": int((y == 0).sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="full_pool.py rehead run names (runs/full_pool/NAME or the shipped copy) or model folders")
    parser.add_argument("--gap", type=float, default=0.5, help="PBE gap (eV) above which a training crystal counts as a non-metal")
    args = parser.parse_args(argv)
    folders = {name: Path(name) if Path(name).is_dir() else finished_run(name) for name in args.runs}
    if missing := [n for n, f in folders.items() if f is None]:
        raise SystemExit(f"not finished (runs/full_pool or models/): {missing}")
    models = {name: load_model_folder(folder)[0] for name, folder in folders.items()}
    prints = {features_fingerprint(m) for m in models.values()}
    if len(prints) != 1:
        raise SystemExit(f"{args.runs}: their backbones or adapters differ; the cached features serve runs of one source only")
    cache = RUNS / f".pooled_{prints.pop()[:16]}_82111.pt"
    if not cache.is_file():
        raise SystemExit(f"{cache}: not there; run full_pool.py rehead on one of these runs' source first")
    saved = torch.load(cache, map_location="cpu", weights_only=True)
    if not saved.get("complete"):
        raise SystemExit(f"{cache}: the pass over the training crystals has not finished")
    x, y = torch.cat(list(saved["feats"])), torch.cat(list(saved["ys"])).numpy()
    out = {"cache": cache.name, "training_crystals": len(y), "nonmetal_threshold_ev": args.gap, "runs": {}}
    for name, folder in folders.items():
        model = models[name]
        z, gap = head_outputs(model.head, x)
        out["runs"][name] = {"folder": str(folder), "output": model.head_config.output, **census(z, gap, y, args.gap)}
        print(name, out["runs"][name])
    write_json(RESULTS / "dead_zone.json", out)
    return out


if __name__ == "__main__":
    main()
