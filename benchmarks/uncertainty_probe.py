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
  and draws, epistemic = spread over heads and draws; the variance MLPs refitted to the in-sample
  (``heads<K>``) or out-of-fold (``heads<K>_oof_var``) residuals of the heads' mean;
- ``heads<K>_boot`` (``--bootstrap``): the same with each of the K heads fitted on its own resample of
  the rows (bagging: ``_fit_gap_heads(bootstrap=True)``), for members that differ in their data too.

Each is scored with three stds, recalibrated on validation: ``total`` = hypot(epistemic, aleatoric),
one scale and a floor fitted by the validation NLL (``StdScaler``, as ``calibrate_and_score`` does);
``total_geometric``, the same with the variance members' geometric mean (their mean log-variance)
instead of the head's arithmetic one; ``two_scale``, the epistemic and aleatoric parts scaled apart
(both scales and the floor fitted by the validation NLL). Metrics (``metrics.evaluate``): MAE,
Spearman(|error|, std), NLL and Gaussian 90 % coverage on all crystals and non-metals, and the
Spearman of each part alone. Features of the validation and test crystals (posterior mean and
``--draws`` draws) are cached in runs/full_pool (``.evalfeats_<fingerprint>_S<draws>.pt``); the folds,
gap heads and variance refits are kept there too (``finetune.kept_result``: a killed run resumes, and
``full_pool.py rehead`` with the same settings reuses the folds and gap heads); each variant's arrays
go to ``.probe_<run>_<variant>.npz`` there.

Measured (BENCHMARKS.md section 0) on the one-head model shipped before the five-head one, whose
``heads5`` variant the five-head model is (``full_pool.py rehead ..._heads5_var5_full`` reused its heads):

    python benchmarks/uncertainty_probe.py runs/full_pool/balora_full_2blocks_10ep_head512x3cens_drawn16kx2_var5_full --heads 5 --threads 2

(run as ``models/balora`` while that model was shipped; the JSON records that path); the bagged
variants, added to the same JSON by the next session:

    python benchmarks/uncertainty_probe.py runs/full_pool/balora_full_2blocks_10ep_head512x3cens_drawn16kx2_var5_full --heads 5 --bootstrap --threads 2
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
from matbalora.finetune import _fit_gap_heads, _refit_features, _training_features, features_fingerprint, kept_out_of_fold_gaps, kept_result, rehead_of, state_fingerprint  # noqa: E402
from matbalora.head import BandGapHead, gap_only_config  # noqa: E402
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
    drawn = []
    model.train(False)
    with torch.no_grad():
        for start in range(0, len(graphs), batch):  # [S, batch, d]: the draws of a batch, seeded by its start
            chunk = graphs[start : start + batch]
            with model.context.sampling("sample", generator=torch.Generator().manual_seed(start)):
                drawn.append(fam.crystal_features(model.backbone, chunk, samples=draws, context=model.context, pooling=pooling))
            print(f"\reval features {start + len(chunk)}/{len(graphs)}", end="", flush=True)
    print()
    feats = {"mean": model.pooled_features(graphs, batch=batch), "draws": torch.cat(drawn, 1)}
    atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


def two_scale_nll(epi: np.ndarray, alea: np.ndarray, err2: np.ndarray) -> tuple[float, float, float]:
    """(k_e, k_a, c) minimising the mean Gaussian NLL of ``err`` under variance (k_e epi)^2 + (k_a alea)^2
    + c^2: the two parts recalibrated apart (L-BFGS on their logarithms, numerical gradient)."""
    from scipy.optimize import minimize

    def nll(theta: np.ndarray) -> float:
        ke2, ka2, c2 = np.exp(2 * theta)
        var = ke2 * epi**2 + ka2 * alea**2 + c2
        return float(0.5 * np.mean(np.log(var) + err2 / var))

    rms = float(np.sqrt(np.mean(err2)))
    res = min((minimize(nll, np.array(start), method="L-BFGS-B") for start in ([0.0, 0.0, np.log(rms * 1e-2)], [-1.0, 0.5, np.log(rms / 4)])),
              key=lambda r: r.fun)
    return tuple(float(v) for v in np.exp(res.x))


def score(gap_heads: list[BandGapHead], variance_head: BandGapHead, feats: dict, y: torch.Tensor, n_val: int, arrays: Path | None = None) -> dict:
    """Gap = mean over heads and draws; epistemic = spread over heads and draws; aleatoric = sqrt of the
    members' variance averaged over draws: ``mean`` (as the head does: the log of the members' mean
    variance) or ``geometric`` (the members' mean log-variance). Each std is recalibrated on the first
    ``n_val`` crystals: ``total`` (hypot(epi, alea), one scale k and a floor c, as calibrate_and_score
    does), ``total_geometric`` (the same with geometric-mean members) and ``two_scale`` (epi and alea
    scaled apart, k_e, k_a and c fitted by the validation NLL); metrics of val and test."""
    with torch.no_grad():
        g = torch.stack([h(feats["draws"])["gap"] for h in gap_heads]).flatten(0, 1)  # [K S, n]
        members = variance_head.member_log_vars(feats["draws"])  # [M, S, n]
        alea = np.sqrt(variance_head(feats["draws"])["log_var"].exp().mean(0).numpy())  # as the head combines its members
        alea_geo = np.sqrt(members.mean(0).exp().mean(0).numpy())
    gap, epi = g.mean(0).numpy(), g.std(0).numpy()
    y = y.numpy()
    if arrays is not None:  # for a look beyond these numbers
        np.savez(arrays, gap=gap, epistemic=epi, aleatoric=alea, aleatoric_geometric=alea_geo, y=y, n_val=n_val)
    val, test = slice(0, n_val), slice(n_val, None)
    out = {}
    for name, part in (("epistemic", epi), ("aleatoric", alea), ("aleatoric_geometric", alea_geo)):
        out[name] = {p: {k: round(m[k], 4) for k in ("spearman", "nonmetal_spearman")}
                     for p, s in (("val", val), ("test", test)) for m in [evaluate(gap[s], np.maximum(part[s], 1e-9), y[s])]}
    err2 = (gap[val] - y[val]) ** 2
    ke, ka, c = two_scale_nll(epi[val], alea[val], err2)
    stds = {"total": np.hypot(epi, alea), "total_geometric": np.hypot(epi, alea_geo)}
    for name, std in stds.items():
        scaler = StdScaler().fit(gap[val], std[val], y[val], floor=True)
        stds[name] = scaler.transform(std)
        out[name] = {"recalibration": {"factor": round(scaler.factor, 4), "floor": round(scaler.floor, 4)}}
    stds["two_scale"] = np.sqrt((ke * epi) ** 2 + (ka * alea) ** 2 + c**2)
    out["two_scale"] = {"recalibration": {"epistemic": round(ke, 4), "aleatoric": round(ka, 4), "floor": round(c, 4)}}
    for name in ("total", "total_geometric", "two_scale"):
        for p, s in (("val", val), ("test", test)):
            m = evaluate(gap[s], stds[name][s], y[s])
            out[name][p] = {k: round(m[k], 4) for k in KEYS} | {f"nonmetal_{k}": round(m[f"nonmetal_{k}"], 4) for k in KEYS}
    return out


def markdown_rows(results: dict) -> list[str]:
    """One table row per variant (std ``total``): val MAE, Spearman all / nm, NLL; test the same; the
    epistemic part alone on test non-metals (BENCHMARKS.md section 0)."""
    rows = []
    for variant, r in results["variants"].items():
        v, t = r["total"]["val"], r["total"]["test"]
        rows.append(f"| {variant} | {v['mae']:.3f} | {v['spearman']:.3f} / {v['nonmetal_spearman']:.3f} | {v['nll']:.3f} | {t['mae']:.3f} | "
                    f"{t['spearman']:.3f} / {t['nonmetal_spearman']:.3f} | {t['nll']:.3f} | {r['epistemic']['test']['nonmetal_spearman']:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a rehead model folder (models/balora or runs/full_pool/NAME)")
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--fold-epochs", type=int, default=40)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", action="store_true", help="only the bagged variants (--heads gap heads, each on its own resample of the rows), added to an earlier run's JSON")
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
    earlier = RESULTS / f"uncertainty_probe_{name}.json"
    if args.bootstrap and earlier.is_file():  # the other variants as an earlier run scored them
        results = json.loads(earlier.read_text())
        results["command_bootstrap"] = " ".join(sys.argv)

    def report(variant: str, gap_heads, variance_head) -> None:
        results["variants"][variant] = score(gap_heads, variance_head, feats, y_eval, n_val, RUNS / f".probe_{name}_{variant}.npz")
        print(variant, json.dumps(results["variants"][variant]), flush=True)
        write_json(RESULTS / f"uncertainty_probe_{name}.json", results)

    def variance_of(gap_heads: list[BandGapHead], oof: torch.Tensor | None) -> BandGapHead:
        """The shipped head's variance members refitted to the residuals of the heads' mean gap
        (in-sample, or out of fold when ``oof``); kept next to the runs."""
        head = copy.deepcopy(shipped)
        with torch.no_grad():
            own = torch.stack([h(x)["gap"] for h in gap_heads]).mean(0)
        key = f"{features_fingerprint(model)}:{[state_fingerprint(h.state_dict()) for h in gap_heads]}:{oof is not None}:{rehead['variance_refit']['epochs']}"

        def fit() -> dict:
            refit_variance(head, (x, y - (oof if oof is not None else own) + own), val, epochs=rehead["variance_refit"]["epochs"])
            return {"state": head.state_dict()}

        head.load_state_dict(kept_result(RUNS, "probevar", key, fit)["state"])
        return head.eval()

    lr = rehead["head_refit"]["lr"]
    t0 = time.perf_counter()
    oof = kept_out_of_fold_gaps(model, RUNS, gap_only_config(head_config), x, y, folds=args.folds, epochs=args.fold_epochs, lr=lr)
    print(f"out-of-fold gaps: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.bootstrap:
        report("shipped", [shipped], shipped)
        report("oof_var", [shipped], variance_of([shipped], oof))
    for k in sorted({3, args.heads}) if not args.bootstrap else ():
        t0 = time.perf_counter()
        heads, _fits = _fit_gap_heads(model, RUNS / name, rows, val, head_config, members=k, epochs=REHEAD_DEFAULTS["epochs"], lr=lr,
                                      patience=REHEAD_DEFAULTS["patience"], seed=0)
        print(f"{k} gap heads: {time.perf_counter() - t0:.0f} s", flush=True)
        report(f"heads{k}", heads, variance_of(heads, None))
        report(f"heads{k}_oof_var", heads, variance_of(heads, oof))
    if args.bootstrap:
        t0 = time.perf_counter()
        heads, _fits = _fit_gap_heads(model, RUNS / name, rows, val, head_config, members=args.heads, epochs=REHEAD_DEFAULTS["epochs"], lr=lr,
                                      patience=REHEAD_DEFAULTS["patience"], seed=0, bootstrap=True)
        print(f"{args.heads} bootstrap gap heads: {time.perf_counter() - t0:.0f} s", flush=True)
        report(f"heads{args.heads}_boot", heads, variance_of(heads, None))
        report(f"heads{args.heads}_boot_oof_var", heads, variance_of(heads, oof))
    print("\n".join(markdown_rows(results)))

if __name__ == "__main__":
    main()
