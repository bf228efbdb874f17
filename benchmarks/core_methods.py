"""Issue-2 measurement: head / lora / balora / full fine-tuning on one seeded split of mp_gap.

    python benchmarks/core_methods.py --n-train 2000 --n-val 500 --epochs 2

Reports wall time per epoch and per structure, validation MAE (deterministic posterior mean),
and the share of trainable parameters; writes benchmarks/results/core_methods.json.
Graphs are converted once and shared by all methods.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from matbalora.atomic import write_json
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig
from matbalora.data.extxyz import read_extxyz
from matbalora.model import BandGapModel
from matbalora.training import fit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"


def load_split(n_train: int, n_val: int, seed: int):
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read_extxyz(DATA)
    order = np.random.default_rng(seed).permutation(len(frames))[: n_train + n_val]
    picked = [frames[i] for i in order]
    structs = [AseAtomsAdaptor.get_structure(a) for a in picked]
    gaps = np.array([float(a.info["band_gap"]) for a in picked])
    ids = [str(a.info["material_id"]) for a in picked]
    return structs, gaps, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="head,lora,balora,full,lora-gated")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "core_methods.json"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "core"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    structs, gaps, ids = load_split(args.n_train, args.n_val, args.seed)
    t_load = time.perf_counter() - t0
    converter = BandGapModel.from_pretrained("head").backbone.graph_converter
    t0 = time.perf_counter()
    graphs = [converter(s, graph_id=i) for s, i in zip(structs, ids)]
    t_graph = time.perf_counter() - t0
    tr = (graphs[: args.n_train], gaps[: args.n_train])
    va = (graphs[args.n_train :], gaps[args.n_train :])
    results = {
        "command": "python benchmarks/core_methods.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "runs")),
        "data": str(DATA.name),
        "n_train": args.n_train,
        "n_val": args.n_val,
        "load_seconds": t_load,
        "graph_seconds_per_structure": t_graph / len(graphs),
        "val_metal_fraction": float(np.mean(va[1] == 0)),
        "val_mae_predict_train_mean": float(np.mean(np.abs(va[1] - tr[1].mean()))),
        "methods": {},
    }
    for spec in args.methods.split(","):
        method, _, variant = spec.partition("-")
        head = HeadConfig(output="gated" if variant == "gated" else "softplus")
        adapter = AdapterConfig(bayesian=method == "balora") if method in ("lora", "balora") else None
        torch.manual_seed(args.seed)
        model = BandGapModel.from_pretrained(method, adapter=adapter, head=head)
        counts = model.parameter_counts()
        cfg = TrainConfig(method=method, epochs=args.epochs, seed=args.seed, patience=args.epochs)
        t0 = time.perf_counter()
        hist = fit(model, tr, va, cfg, out_dir=Path(args.runs) / spec, progress=False)
        wall = time.perf_counter() - t0
        h = hist["history"]
        results["methods"][spec] = {
            "head_output": head.output,
            "trainable_params": counts["trainable"],
            "trainable_share": counts["trainable"] / counts["total"],
            "epochs": len(h),
            "seconds_per_epoch": float(np.mean([e["train_seconds"] for e in h])),
            "seconds_per_structure": float(np.mean([e["seconds_per_structure"] for e in h])),
            "wall_seconds": wall,
            "val_mae_per_epoch": [e["val_mae"] for e in h],
            "best_val_mae": hist["best_val_mae"],
        }
        print(json.dumps({spec: results["methods"][spec]}), flush=True)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
