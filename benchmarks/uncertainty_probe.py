"""Which uncertainty ranks the shipped wide head's errors best? A probe on cached features (issue 14).

The shipped BaLoRA (a censored 512 x 3 gap head refitted on frozen pooled features, ``full_pool.py
rehead``) misses the ranking targets: its five variance MLPs learn from in-sample residuals of a head
that fits its training crystals closely. This probe scores, on the same validation and test crystals
and the same 16 adapter draws, uncertainties built from the model's cached features:

- ``shipped``: the model as it is (gap head, in-sample variance MLPs; epistemic = spread over draws);
- ``oof_var``: the same gap head, variance MLPs fitted to out-of-fold residuals
  (``training.out_of_fold_gaps``, ``--folds`` heads of the same config, ``--fold-epochs`` each);
- ``heads<K>``: K gap heads of the same config from different seeds (the shipped one and K - 1 new,
  each fitted like the shipped one: ``training.refit_head`` on the same rows); gap = mean over heads
  and draws, epistemic = spread over heads and draws; with the shipped in-sample variance MLPs
  (``heads<K>``) or the out-of-fold ones (``heads<K>_oof_var``), refitted around the heads' mean.

Each is recalibrated on validation (``StdScaler`` with a floor, as ``calibrate_and_score`` does) and
scored by ``metrics.evaluate``: MAE, Spearman(|error|, std), NLL and Gaussian 90 % coverage on all
crystals and non-metals. Features of the validation and test crystals (posterior mean and
``--draws`` draws) are cached in runs/full_pool (``.evalfeats_<fingerprint>_S<draws>.pt``), and
every fitted head in ``runs/full_pool/probe_<name>/``: a killed run resumes.

    python benchmarks/uncertainty_probe.py models/balora --heads 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import REHEADS, RESULTS, RUNS, STORES, eval_data, full_pool, open_store  # noqa: E402

from matbalora.atomic import atomic_write, write_json  # noqa: E402
from matbalora.backbones.prefix_store import StoreBatches  # noqa: E402
from matbalora.calibration import StdScaler  # noqa: E402
from matbalora.checkpoint import load_model_folder  # noqa: E402
from matbalora.finetune import _fit_gap_heads, _refit_features, _training_features, features_fingerprint, gap_head_config, kept_out_of_fold_gaps, rehead_of  # noqa: E402
from matbalora.head import BandGapHead  # noqa: E402
from matbalora.metrics import evaluate  # noqa: E402
from matbalora.training import refit_variance  # noqa: E402

#: rehead_of's head-fit settings, which the shipped head was fitted with
REHEAD_DEFAULTS = {k: p.default for k, p in inspect.signature(rehead_of).parameters.items() if p.default is not inspect.Parameter.empty}
KEYS = ("mae", "spearman", "nll", "coverage_90")


def eval_features(model, data, draws: int, batch: int = 32) -> dict[str, torch.Tensor]:
    """Pooled features of the validation + test crystals: ``mean`` [n, d] (posterior mean) and
    ``draws`` [S, n, d] (one adapter draw per crystal and sample), cached by the model's fingerprint."""
    path = RUNS / f".evalfeats_{features_fingerprint(model)[:16]}_S{draws}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    graphs = [data.graphs[i] for i in (*data.split.val, *data.split.test)]
    fam, pooling = model.family, model.head_config.pooling
    mean, drawn = [], []
    model.train(False)
    with torch.no_grad():
        for start in range(0, len(graphs), batch):
            chunk = graphs[start : start + batch]
            with model.context.sampling("mean"):
                mean.append(fam.crystal_features(model.backbone, chunk, context=model.context, pooling=pooling)[0])
            with model.context.sampling("sample", generator=torch.Generator().manual_seed(start)):
                drawn.append(fam.crystal_features(model.backbone, chunk, samples=draws, context=model.context, pooling=pooling))
            print(f"\reval features {start + len(chunk)}/{len(graphs)}", end="", flush=True)
    print()
    feats = {"mean": torch.cat(mean), "draws": torch.cat(drawn, 1)}
    atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


def score(gap_heads: list[BandGapHead], variance_head: BandGapHead, feats: dict, y: torch.Tensor, n_val: int) -> dict:
    """Gap = mean over heads and draws, std = hypot(spread over heads and draws, sqrt(mean aleatoric
    variance over draws)), recalibrated on the first ``n_val`` crystals; metrics of val and test."""
    with torch.no_grad():
        g = torch.stack([h(feats["draws"])["gap"] for h in gap_heads]).flatten(0, 1)  # [K S, n]
        alea = variance_head(feats["draws"])["log_var"].exp().mean(0)
    gap, epi = g.mean(0).numpy(), g.std(0).numpy()
    std = np.hypot(epi, np.sqrt(alea.numpy()))
    y = y.numpy()
    val, test = slice(0, n_val), slice(n_val, None)
    scaler = StdScaler().fit(gap[val], std[val], y[val], floor=True)
    out = {"recalibration": {"factor": scaler.factor, "floor": scaler.floor}}
    for part, s in (("val", val), ("test", test)):
        m = evaluate(gap[s], scaler.transform(std[s]), y[s])
        out[part] = {k: round(m[k], 4) for k in KEYS} | {f"nonmetal_{k}": round(m[f"nonmetal_{k}"], 4) for k in KEYS}
        # the parts apart: does each alone rank the errors?
        for name, part_std in (("epistemic", epi[s]), ("aleatoric", np.sqrt(alea.numpy()[s]))):
            mm = evaluate(gap[s], np.maximum(part_std, 1e-9), y[s])
            out[part][f"{name}_spearman"] = round(mm["spearman"], 4)
            out[part][f"{name}_nonmetal_spearman"] = round(mm["nonmetal_spearman"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a rehead model folder (models/balora or runs/full_pool/NAME)")
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--fold-epochs", type=int, default=40)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    model, card = load_model_folder(folder)
    rehead = card["training"]["rehead"]
    name = next(w for w in card["command"].split() if w in REHEADS)
    _source, head_config, options = REHEADS[name]
    store = open_store(allow_missing=True, **STORES[name])
    data = eval_data(store)
    n_val = len(data.split.val)
    y_eval = torch.as_tensor(data.targets[[*data.split.val, *data.split.test]], dtype=torch.float32)
    t0 = time.perf_counter()
    feats = eval_features(model, data, args.draws)
    print(f"eval features: {time.perf_counter() - t0:.0f} s", flush=True)
    batches = StoreBatches(store, [i for i in full_pool().train if i in store.kept])
    x, y = _training_features(model, RUNS / name, batches, rehead["crystals"])
    rows = (x, y)
    if options.get("draw_crystals"):
        drawn = _training_features(model, RUNS / name, batches, options["draw_crystals"], draws=options["draws"])
        rows = (torch.cat([x, drawn[0]]), torch.cat([y, drawn[1]]))
    # the validation features as rehead_of computes them: the gap heads and folds below are the ones
    # (kept next to the runs, finetune.kept_result) that ``full_pool.py rehead`` with these settings reuses
    _feats, val = _refit_features(model, RUNS / name, data, batches, rehead["crystals"])
    shipped = copy.deepcopy(model.head).eval()
    results = {"model": str(folder), "run": name, "command": " ".join(sys.argv), "variants": {}}

    def report(variant: str, gap_heads, variance_head) -> None:
        results["variants"][variant] = score(gap_heads, variance_head, feats, y_eval, n_val)
        print(variant, json.dumps(results["variants"][variant]), flush=True)
        write_json(RESULTS / f"uncertainty_probe_{name}.json", results)

    def variance_of(gap_heads: list[BandGapHead], oof: torch.Tensor | None) -> BandGapHead:
        """The shipped head's variance members refitted to the residuals of the heads' mean gap
        (in-sample, or out of fold when ``oof``)."""
        head = copy.deepcopy(shipped)
        with torch.no_grad():
            own = torch.stack([h(x)["gap"] for h in gap_heads]).mean(0)
        refit_variance(head, (x, y - (oof if oof is not None else own) + own), val, epochs=rehead["variance_refit"]["epochs"])
        return head

    report("shipped", [shipped], shipped)
    lr = rehead["head_refit"]["lr"]
    t0 = time.perf_counter()
    oof = kept_out_of_fold_gaps(model, RUNS, gap_head_config(head_config), x, y, folds=args.folds, epochs=args.fold_epochs, lr=lr)
    print(f"out-of-fold gaps: {time.perf_counter() - t0:.0f} s", flush=True)
    report("oof_var", [shipped], variance_of([shipped], oof))
    for k in sorted({3, args.heads}):
        t0 = time.perf_counter()
        heads, _fits = _fit_gap_heads(model, RUNS / name, rows, val, head_config, members=k, epochs=REHEAD_DEFAULTS["epochs"], lr=lr,
                                      patience=REHEAD_DEFAULTS["patience"], seed=0)
        print(f"{k} gap heads: {time.perf_counter() - t0:.0f} s", flush=True)
        report(f"heads{k}", heads, variance_of(heads, None))
        report(f"heads{k}_oof_var", heads, variance_of(heads, oof))

if __name__ == "__main__":
    main()
