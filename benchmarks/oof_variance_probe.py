"""Do variance MLPs fitted to out-of-fold residuals rank a wide head's errors better than ones fitted
to its in-sample residuals? A prototype on the frozen features of a ``rehead`` model (issue 14).

The shipped BaLoRA's 512 x 3 gap head fits its training crystals more closely than unseen ones
(MAE 0.155 vs 0.217 out of fold), so variance MLPs trained on its in-sample residuals see errors that
are too small. Here: K heads of the same config, each trained by L1 on K-1 folds of the training
features (40 epochs, lr 3e-4, cosine, no early stop; ``training.out_of_fold_gaps``) and predicting the held-out fold; then the
model's five variance members refitted (``training.refit_variance``) to those out-of-fold residuals
around the model's own gap. Scores on the posterior-mean (deterministic) features of the validation
and test crystals: MAE, Spearman(|error|, std) on all crystals and non-metals, in-sample vs out-of-fold.

Needs the pooled-feature cache that ``full_pool.py rehead NAME`` leaves in runs/full_pool
(``.pooled_<sha>_<crystals>.pt``). Measured (``--threads 1`` beside the test suite; the same numbers from its
scratch prototype, this file, and this file on ``training.out_of_fold_gaps``, whose folds took 688 s): validation non-metals 0.377 -> 0.392, test 0.352 -> 0.401;
all crystals 0.815 -> 0.820, 0.813 -> 0.822; out-of-fold MAE of the training crystals 0.217 (in-sample 0.155).

    python benchmarks/oof_variance_probe.py balora_full_2blocks_10ep_head512x3_var5_full
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import REHEADS, RUNS, STORES, eval_data, open_store  # noqa: E402

from matbalora.atomic import sha256_file  # noqa: E402
from matbalora.checkpoint import WEIGHTS, load_model_folder  # noqa: E402
from matbalora.head import BandGapHead  # noqa: E402
from matbalora.metrics import evaluate  # noqa: E402
from matbalora.training import out_of_fold_gaps, refit_variance  # noqa: E402


def scores(head: BandGapHead, parts: dict) -> dict:
    """MAE and Spearman(|error|, std) on all crystals and non-metals (``matbalora.metrics.evaluate``)."""
    out = {}
    with torch.no_grad():
        for name, (x, y) in parts.items():
            o = head(x)
            m = evaluate(o["gap"].numpy(), o["log_var"].exp().sqrt().numpy(), y.numpy())
            out[name] = {k: m[k] for k in ("mae", "spearman", "nonmetal_spearman")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(REHEADS))
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = RUNS / args.name
    model, card = load_model_folder(folder)
    source = Path(card["training"]["rehead"]["source"])
    caches = sorted(RUNS.glob(f".pooled_{sha256_file(source / WEIGHTS)[:16]}_*.pt"))
    saved = next((c for c in (torch.load(p, weights_only=True) for p in caches)
                  if c.get("complete") and sum(len(v) for v in c["ys"]) == card["training"]["rehead"]["crystals"]), None)
    if saved is None:
        raise SystemExit(f"no complete pooled-feature cache of {source} in {RUNS}: run full_pool.py rehead {args.name} first")
    x, y = torch.cat(saved["feats"]), torch.cat(saved["ys"])
    data = eval_data(open_store(allow_missing=True, **STORES[args.name]))
    parts = {p: (model.pooled_features([data.graphs[i] for i in getattr(data.split, p)]),
                 torch.as_tensor(data.targets[getattr(data.split, p)], dtype=torch.float32)) for p in ("val", "test")}
    head = model.head.eval()
    print("in-sample residuals", scores(head, parts), flush=True)
    gap_config = replace(head.config, loss="l1", variance="shared", variance_members=1, variance_hidden=0, variance_layers=-1)
    t0 = time.perf_counter()
    oof = out_of_fold_gaps(gap_config, x, y, folds=args.folds, epochs=args.epochs, lr=3e-4)
    print(f"out-of-fold gaps: {time.perf_counter() - t0:.0f} s", flush=True)
    with torch.no_grad():
        own = head(x)["gap"]
    print(f"training crystals: in-sample MAE {float((own - y).abs().mean()):.4f}, out-of-fold {float((oof - y).abs().mean()):.4f}")
    refitted = copy.deepcopy(head)
    refit_variance(refitted, (x, y - oof + own), parts["val"], epochs=100)  # residuals y - own = y - oof
    print("out-of-fold residuals", scores(refitted, parts), flush=True)


if __name__ == "__main__":
    main()
