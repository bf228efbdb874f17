"""SevenNet-0 + BaLoRA / LoRA on MOF band gaps (QMOF), issue 9.

    OMP_NUM_THREADS=1 python benchmarks/qmof_sevennet.py [--split 600 200 400] [--train 300] [--val 100] [--test 0] [--epochs 8]

The test set is the one of ``benchmarks/qmof.py --n-train A --n-val B --n-test C`` (``--split A B C``:
same seeded QMOF rows and split), or a seeded subset of it (``--test``); train and validation are
seeded subsets (``--train``, ``--val``) of that split's train and validation MOFs, for CPU time. Adapters in the last interaction block (the
default), frozen-prefix features computed once and shared by both runs, ``--epochs`` epochs, 16 draws
for BaLoRA, std scaling fitted on the validation subset (``sevennet_mp_gap.evaluate``). One thread.
Writes ``benchmarks/results/qmof_sevennet_<train>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mp_gap_data import REPO  # noqa: E402
from qmof import load_dataset  # noqa: E402
from sevennet_mp_gap import SAMPLES, evaluate  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.config import TrainConfig  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402
from matbalora.training import fit  # noqa: E402

BACKBONE = "sevennet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=int, nargs=3, default=(600, 200, 400), metavar=("N_TRAIN", "N_VAL", "N_TEST"), help="the qmof.py split the MOFs come from")
    ap.add_argument("--train", type=int, default=300, help="training MOFs (seeded subset of the split's train)")
    ap.add_argument("--val", type=int, default=100, help="validation MOFs (seeded subset of the split's val)")
    ap.add_argument("--test", type=int, default=0, help="test MOFs (seeded subset of the split's test; 0: all of it)")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds, split = load_dataset(*args.split)
    rng = np.random.default_rng(0)
    rows = {"train": np.sort(rng.choice(split.train, min(args.train, len(split.train)), replace=False)),
            "val": np.sort(rng.choice(split.val, min(args.val, len(split.val)), replace=False)),
            "test": np.sort(rng.choice(split.test, args.test, replace=False)) if 0 < args.test < len(split.test) else split.test}
    load_seconds = time.perf_counter() - t0
    probe = BandGapModel.from_pretrained("lora", backbone=BACKBONE)
    prefixes_mod = probe.family
    block = prefixes_mod.prefix_block(probe.backbone, "lora")
    t0 = time.perf_counter()
    graphs = {k: [probe.structure_to_graph(ds.structures[i], graph_id=ds.ids[i]) for i in v] for k, v in rows.items()}
    convert_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefixes = {k: prefixes_mod.compute_prefixes(probe.backbone, v, block) for k, v in graphs.items()}
    prefix_seconds = time.perf_counter() - t0
    del graphs
    print(f"data {load_seconds:.0f}s, graphs {convert_seconds:.0f}s, prefixes to block {block} {prefix_seconds:.0f}s", flush=True)
    y = {k: np.asarray(ds.targets[v], dtype=np.float64) for k, v in rows.items()}
    out = {
        "command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]),
        "backbone": BACKBONE,
        "backbone_version": probe.backbone_version,
        "split": {"from": "benchmarks/qmof.py --n-train {} --n-val {} --n-test {}".format(*args.split), "n_train": len(y["train"]), "n_val": len(y["val"]),
                  "n_test": len(y["test"]), "protocol": "train/val/test = seeded (seed 0) subsets of that split's train/val/test MOFs (test: all of them unless --test)"},
        "atoms_mean": float(np.mean([len(ds.structures[i]) for v in rows.values() for i in v])),
        "threads": 1,
        "epochs": args.epochs,
        "prefix_block": block,
        "seconds": {"load": load_seconds, "graphs": convert_seconds, "frozen_prefix_features": prefix_seconds},
        "methods": {},
    }
    result = REPO / "benchmarks" / "results" / f"qmof_{BACKBONE}_{len(y['train'])}.json"
    for method in ("balora", "lora"):
        torch.manual_seed(0)
        model = BandGapModel.from_pretrained(method, backbone=BACKBONE)
        t0 = time.perf_counter()
        history = fit(model, (prefixes["train"], y["train"]), (prefixes["val"], y["val"]),
                      TrainConfig(method=method, epochs=args.epochs, seed=0, patience=args.epochs), progress=False)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        row = evaluate(model, (prefixes["val"], y["val"]), (prefixes["test"], y["test"]), SAMPLES if model.is_bayesian else 0)
        row |= {
            "train_seconds": train_seconds,
            "evaluate_seconds": time.perf_counter() - t0,
            "best_val_mae": history["best_val_mae"],
            "val_mae_per_epoch": [e["val_mae"] for e in history["history"]],
            "trainable_params": model.parameter_counts()["trainable"],
        }
        out["methods"][method] = row
        print(method, json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
        write_json(result, out)
    y_test = y["test"]
    for name, c in (("train_mean", float(np.mean(y["train"]))), ("train_median", float(np.median(y["train"])))):
        out["methods"][name] = {"mae": float(np.mean(np.abs(y_test - c))), "rmse": float(np.sqrt(np.mean((y_test - c) ** 2))), "value": c}
    write_json(result, out)
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
