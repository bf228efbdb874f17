"""Models trained on the whole Materials Project pool (issue 14), from the on-disk prefix store.

    python benchmarks/full_pool_data.py cache --worker 0 --workers 2 &   # once; resumable (both cores)
    python benchmarks/full_pool_data.py cache --worker 1 --workers 2
    python benchmarks/full_pool.py train NAME [NAME ...]   # resumable: a killed run continues from its checkpoint
    python benchmarks/full_pool.py evaluate                # benchmarks/results/full_pool/results.json
    python benchmarks/full_pool.py forest                  # Magpie random forest at the learning-curve sizes
    python benchmarks/full_pool.py ship BALORA ENSEMBLE_PREFIX   # copy into models/

Protocol (``full_pool_data``): test = the 1,000 Matbench fold-0 crystals of every earlier benchmark;
validation = 1,000 crystals of the other folds; training = the rest (82,000+), nested prefixes of one
seeded permutation for the learning curve. Runs go to ``runs/full_pool/NAME``; every metric is reported
on all test crystals and on the non-metals apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool_data import full_pool, open_store, raw_frames  # noqa: E402
from mp_gap_data import REPO  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.backbones.prefix_store import StoreBatches  # noqa: E402
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig  # noqa: E402
from matbalora.data.splits import Split  # noqa: E402
from matbalora.finetune import PreparedData, train_model  # noqa: E402

RUNS = REPO / "runs" / "full_pool"
RESULTS = REPO / "benchmarks" / "results" / "full_pool"
NLL_MEANMAX = HeadConfig(loss="nll", pooling="mean_max")
BF16 = {"compute_dtype": "bfloat16"}
SIZES = {"2k": 2000, "10k": 10_000, "40k": 40_000, "full": None}

#: name -> (method, adapter, head, TrainConfig overrides, training crystals)
RECIPES: dict[str, tuple] = {
    # the recipe study at 10,000 crystals (one run each, chosen on validation)
    "lora_l1_mean_10k": ("lora", AdapterConfig(), HeadConfig(), {**BF16, "epochs": 8}, 10_000),
    "lora_nll_mean_10k": ("lora", AdapterConfig(), HeadConfig(loss="nll"), {**BF16, "epochs": 8}, 10_000),
    "lora_nll_meanmax_10k": ("lora", AdapterConfig(), NLL_MEANMAX, {**BF16, "epochs": 8}, 10_000),
    "lora_nll_meanmax_fp32_10k": ("lora", AdapterConfig(), NLL_MEANMAX, {"epochs": 8}, 10_000),
    **{f"balora_nll_meanmax_beta{b}_10k": ("balora", AdapterConfig(bayesian=True), NLL_MEANMAX,
                                            {**BF16, "epochs": 8, "beta": b, "kl_warmup_steps": 600}, 10_000) for b in (0, 0.01, 0.1, 1)},
    # the full pool
    "balora_full": ("balora", AdapterConfig(bayesian=True), NLL_MEANMAX, {**BF16, "epochs": 4, "beta": 0.01, "kl_warmup_steps": 2000}, None),
    **{f"lora_full_seed{s}": ("lora", AdapterConfig(), NLL_MEANMAX, {**BF16, "epochs": 2, "seed": s}, None) for s in range(5)},
}

_FORMULA = re.compile(r"formula=(\S+)")


def eval_data(store) -> PreparedData:
    """Validation and test crystals of the pool as in-memory prefixes (fp32), in that order."""
    pool = full_pool()
    frames, ids, _ = raw_frames()
    formula = {sid: _FORMULA.search(f.comment).group(1) for sid, f in zip(ids, frames)}
    val = [i for i in pool.val if i in store.kept]
    test = [i for i in pool.test if i in store.kept]
    keep = val + test
    graphs = store.prefix_graphs(keep)
    split = Split(np.zeros(0, np.int64), np.arange(len(val)), np.arange(len(val), len(keep)), kind="full pool: val + Matbench fold-0 test", seed=0)
    from pymatgen.core import Composition

    return PreparedData(
        ids=keep, formulas=[Composition(formula[i]).reduced_formula for i in keep], n_atoms=[int(g.atom.shape[0]) for g in graphs],
        targets=store.targets(keep), graphs=graphs, split=split,
        provenance={"source": "shared/data/mp_gap/mp_gap.extxyz.gz", "protocol": "benchmarks/full_pool_data.py", "store": str(store.root),
                    "rejected_in_store": len(store.rejected())},
    )


def train(name: str) -> Path:
    method, adapter, head, overrides, n_train = RECIPES[name]
    torch.set_num_threads(1)
    store = open_store()
    train_ids = [i for i in full_pool().train_subset(n_train) if i in store.kept]
    cfg = replace(TrainConfig(method=method), **overrides)
    out = RUNS / name
    if (out / "config.json").is_file():
        print(f"{name}: finished already ({out})")
        return out
    t0 = time.perf_counter()
    train_model(None, out, train=cfg, adapter=adapter, head=head, data=eval_data(store), train_batches=StoreBatches(store, train_ids),
                resume=(out / "checkpoint").is_dir(), samples=16, progress=True)
    print(f"{name}: {len(train_ids)} crystals, {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _scores(frame, y: np.ndarray) -> dict:
    from matbalora.metrics import evaluate

    out = {}
    for part, mask in (("all", np.ones(len(y), bool)), ("nonmetal", y > 0)):
        m = evaluate(frame["band_gap"].to_numpy()[mask], frame["std"].to_numpy()[mask], y[mask])
        out[part] = {k: m[k] for k in ("mae", "rmse", "spearman", "nll", "coverage_90", "mean_interval_width_90") if k in m}
    return out


def evaluate() -> dict:
    """Test metrics (all / non-metals) of every finished run and ensemble, from the model cards'
    calibration; ensembles of the runs ``lora_*_seedK``."""
    from matbalora.predict import EnsemblePredictor, Predictor
    from matbalora.finetune import calibrate_and_score

    store = open_store()
    data = eval_data(store)
    y = data.targets[data.split.test]
    results = {"protocol": __doc__.split("Protocol")[1].strip(), "runs": {}}
    for name in RECIPES:
        folder = RUNS / name
        if not (folder / "config.json").is_file():
            continue
        pred = Predictor.load(folder)
        card = pred.card
        frame = pred.predict_prepared(data.part("test"), samples=16 if pred.model.is_bayesian else 0)
        results["runs"][name] = {"n_train": card["data"]["n_train"], "epochs": card["training"]["epochs_run"], "best_val_mae": card["training"]["best_val_mae"],
                                 "train_seconds": card["training"]["train_seconds"], "std_scale": card["calibration"].get("std_scale"),
                                 "std_floor": card["calibration"].get("std_floor"), **_scores(frame, y),
                                 "median_std_epistemic": float(np.nanmedian(frame["std_epistemic"])), "median_std_aleatoric": float(np.nanmedian(frame["std_aleatoric"]))}
        print(name, json.dumps(results["runs"][name]["all"]), json.dumps(results["runs"][name]["nonmetal"]), flush=True)
    prefixes = sorted({re.sub(r"_seed\d+$", "", n) for n in RECIPES if re.search(r"_seed\d+$", n)})
    for prefix in prefixes:
        members = sorted(p for p in RUNS.glob(f"{prefix}_seed*") if (p / "config.json").is_file())
        if len(members) < 2:
            continue
        ens = EnsemblePredictor([Predictor.load(p) for p in members])
        calibration, _ = calibrate_and_score(ens, data, samples=0)
        frame = ens.predict_prepared(data.part("test"))
        results["runs"][f"{prefix}_ensemble{len(members)}"] = {"members": len(members), "std_scale": calibration.get("std_scale"), "std_floor": calibration.get("std_floor"), **_scores(frame, y)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="+", choices=sorted(RECIPES))
    sub.add_parser("evaluate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "train":
        for name in args.names:
            train(name)
    elif args.cmd == "evaluate":
        evaluate()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
