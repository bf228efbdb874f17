"""SevenNet-0 + BaLoRA / LoRA on a small subset of the mp_gap benchmark split (issue 9, part 2).

Same split as ``benchmarks/mp_gap.py`` (``SplitSizes(2000, 500, 1000, seed=0)``): the same 1000
Matbench fold-0 test crystals; by default the same 2000 train and 500 validation crystals
(``--n-train``/``--n-val`` take seeded subsets of them). Adapters in the last interaction block (the
default), frozen prefix features computed once and shared by both runs, 6 epochs, 16 draws for
BaLoRA, recalibration (scale and floor) fitted on validation. Prediction speed: SevenNet-0 and
CHGNet 0.3.0 (same placement, same draws) on the same test crystals, timed back to back in this
run, so their ratio holds whatever else the machine is doing. One thread::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sevennet_mp_gap.py

writes ``benchmarks/results/sevennet_mp_gap.json`` (other sizes: ``sevennet_mp_gap_<train>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mp_gap_data import MP_GAP, REPO, SplitSizes, read_frames, select_rows  # noqa: E402

from matbalora.backbones.sevennet import FAMILY as SEVENNET  # noqa: E402
from matbalora.calibration import StdScaler  # noqa: E402
from matbalora.data.graph_cache import GraphCache  # noqa: E402
from matbalora.finetune import default_cache_dir  # noqa: E402
from matbalora.config import TrainConfig  # noqa: E402
from matbalora.data.entries import build_dataset  # noqa: E402
from matbalora.data.formats import atoms_entry  # noqa: E402
from matbalora.metrics import coverage, mae, nll, rmse, spearman  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402
from matbalora.training import fit  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sevennet_mp_gap.py"
SPLIT = SplitSizes(n_train=2000, n_val=500, n_test=1000, seed=0)  # the CHGNet benchmark's split
SMOKE = bool(os.environ.get("MATBALORA_BENCH_SMOKE"))  # a 1-minute check of the script itself
N_TEST = 20 if SMOKE else 1000
EPOCHS = 1 if SMOKE else 6
SAMPLES = 16
N_TIMING = 5 if SMOKE else 50  # test crystals timed end to end (graphs -> gaps, no cached prefixes)
STD_FLOOR = 1e-6
TIMING_REPEATS = 2


def result_path(n_train: int) -> Path:
    if SMOKE:
        return Path("/tmp/sevennet_mp_gap_smoke.json")
    name = "sevennet_mp_gap.json" if n_train == SPLIT.n_train else f"sevennet_mp_gap_{n_train}.json"
    return REPO / "benchmarks" / "results" / name


def load_split(n_train: int, n_val: int):
    """Structures (validated as the CHGNet benchmark does) and gaps of train / val / test."""
    frames = read_frames(MP_GAP)
    mb_index = np.array([int(a.info["matbench_index"]) for a in frames])
    train, val, test = select_rows(mb_index, SPLIT)
    rng = np.random.default_rng(SPLIT.seed)
    parts = {"train": np.sort(rng.choice(train, n_train, replace=False)), "val": np.sort(rng.choice(val, n_val, replace=False)), "test": test[:N_TEST]}
    out = {}
    for name, rows in parts.items():
        entries = (atoms_entry(frames[i], str(frames[i].info["material_id"]), target_key="band_gap", max_atoms=500) for i in rows)
        ds = build_dataset(entries, provenance={"source": str(MP_GAP), "part": name})
        out[name] = (list(ds.structures), np.asarray(ds.targets, dtype=np.float64), list(ds.ids), len(rows) - len(ds))
    return out


def evaluate(model: BandGapModel, val, test, samples: int, seed: int = 0) -> dict:
    (val_x, y_val), (test_x, y_test) = val, test
    g = model.sample_gaps(test_x, samples=samples, seed=seed).gaps
    mean = g.mean(0)
    zero = np.zeros_like(mean)
    row = {"mae": mae(mean, zero, y_test), "rmse": rmse(mean, zero, y_test), "samples": samples}
    if g.shape[0] > 1:
        std = np.maximum(g.std(0, ddof=1), STD_FLOOR)
        gv = model.sample_gaps(val_x, samples=samples, seed=seed).gaps
        val_mean, val_std = gv.mean(0), np.maximum(gv.std(0, ddof=1), STD_FLOOR)
        scaler, single = StdScaler().fit(val_mean, val_std, y_val, floor=True), StdScaler().fit(val_mean, val_std, y_val)
        row |= {
            "spearman": spearman(mean, std, y_test),
            "coverage_90": coverage(0.9)(mean, scaler.transform(std), y_test),
            "coverage_90_scale_only": coverage(0.9)(mean, single.transform(std), y_test),
            "coverage_90_uncalibrated": coverage(0.9)(mean, std, y_test),
            "nll": nll(mean, scaler.transform(std), y_test),
            "nll_scale_only": nll(mean, single.transform(std), y_test),
            "std_scale": scaler.factor, "std_floor": scaler.floor, "std_scale_only": single.factor,
            "std_median_uncalibrated": float(np.median(std)),
        }
    else:
        row |= {"spearman": None, "coverage_90": None, "coverage_90_uncalibrated": None, "nll": None, "std_scale": None}
    return row


def speed_vs_chgnet(sevennet_graphs: list, structures: list) -> dict:
    """ms per crystal from graphs (every block runs), SevenNet-0 and CHGNet 0.3.0 with last-block
    adapters, deterministic and 16 draws, interleaved ``TIMING_REPEATS`` times; the ratio is the result."""
    chgnet = BandGapModel.from_pretrained("balora")
    cache = GraphCache(default_cache_dir(), converter=chgnet.backbone.graph_converter, backbone_version=chgnet.backbone_version)
    chgnet_graphs = cache.graphs(structures, ids=[f"t{i}" for i in range(len(structures))], workers=1, progress=False)
    sevennet = BandGapModel.from_pretrained("balora", backbone="sevennet")
    times: dict = {f"{b}_S{s}": [] for b in ("sevennet", "chgnet") for s in (0, SAMPLES)}
    for _ in range(TIMING_REPEATS):
        for name, model, graphs in (("sevennet", sevennet, sevennet_graphs), ("chgnet", chgnet, chgnet_graphs)):
            for s in (0, SAMPLES):
                t0 = time.perf_counter()
                model.sample_gaps(graphs, samples=s, seed=0)
                times[f"{name}_S{s}"].append(1000 * (time.perf_counter() - t0) / len(graphs))
    best = {k: min(v) for k, v in times.items()}
    return {"crystals": len(structures), "repeats": TIMING_REPEATS, "ms_per_crystal_best": best,
            "ratio_sevennet_over_chgnet_S0": best["sevennet_S0"] / best["chgnet_S0"],
            f"ratio_sevennet_over_chgnet_S{SAMPLES}": best[f"sevennet_S{SAMPLES}"] / best[f"chgnet_S{SAMPLES}"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20 if SMOKE else SPLIT.n_train)
    ap.add_argument("--n-val", type=int, default=10 if SMOKE else SPLIT.n_val)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = t0 = time.perf_counter()
    data = load_split(args.n_train, args.n_val)
    load_seconds = time.perf_counter() - t0
    probe = BandGapModel.from_pretrained("lora", backbone="sevennet")
    t0 = time.perf_counter()
    graphs = {k: [probe.structure_to_graph(s, graph_id=i) for s, i in zip(v[0], v[2])] for k, v in data.items()}
    convert_seconds = time.perf_counter() - t0
    block = SEVENNET.prefix_block(probe.backbone, "lora")
    t0 = time.perf_counter()
    prefixes = {k: SEVENNET.compute_prefixes(probe.backbone, v, block) for k, v in graphs.items()}
    prefix_seconds = time.perf_counter() - t0
    print(f"data {load_seconds:.0f}s, graphs {convert_seconds:.0f}s, prefixes to block {block} {prefix_seconds:.0f}s", flush=True)
    y = {k: v[1] for k, v in data.items()}
    out = {
        "command": COMMAND + ("" if args.n_train == SPLIT.n_train and args.n_val == SPLIT.n_val else f" --n-train {args.n_train} --n-val {args.n_val}"),
        "backbone": "sevennet",
        "backbone_version": probe.backbone_version,
        "split": {**SPLIT.__dict__, "n_train_used": len(y["train"]), "n_val_used": len(y["val"]), "n_test_used": len(y["test"]),
                  "rejected": {k: v[3] for k, v in data.items()},
                  "protocol": f"test = the CHGNet benchmark's {N_TEST} Matbench fold-0 crystals; train/val = seeded subsets ({args.n_train}/{args.n_val}) of its train/val rows"},
        "threads": 1,
        "epochs": EPOCHS,
        "prefix_block": block,
        "seconds": {"load": load_seconds, "graphs": convert_seconds, "frozen_prefix_features": prefix_seconds},
        "methods": {},
    }
    for method in ("balora", "lora"):
        torch.manual_seed(0)
        model = BandGapModel.from_pretrained(method, backbone="sevennet")
        t0 = time.perf_counter()
        history = fit(model, (prefixes["train"], y["train"]), (prefixes["val"], y["val"]),
                      TrainConfig(method=method, epochs=EPOCHS, seed=0, patience=EPOCHS), progress=False)
        train_seconds = time.perf_counter() - t0
        samples = SAMPLES if model.is_bayesian else 0
        row = evaluate(model, (prefixes["val"], y["val"]), (prefixes["test"], y["test"]), samples)
        t0 = time.perf_counter()
        model.sample_gaps(graphs["test"][:N_TIMING], samples=samples, seed=0)
        row |= {
            "train_seconds": train_seconds,
            "train_seconds_with_prefix_features": train_seconds + prefix_seconds * (len(y["train"]) + len(y["val"])) / sum(len(v) for v in y.values()),
            "predict_ms_per_structure": 1000 * (time.perf_counter() - t0) / N_TIMING,
            "best_val_mae": history["best_val_mae"],
            "val_mae_per_epoch": [e["val_mae"] for e in history["history"]],
            "trainable_params": model.parameter_counts()["trainable"],
        }
        out["methods"][method] = row
        print(method, json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    out["predict_ms_note"] = f"end to end from graphs (all 5 blocks, {SAMPLES} draws for BaLoRA, 1 pass for LoRA) on the first {N_TIMING} test crystals, 1 thread"
    out["speed_vs_chgnet"] = speed_vs_chgnet(graphs["test"][:N_TIMING], data["test"][0][:N_TIMING])
    out["seconds"]["total"] = time.perf_counter() - t_start
    result = result_path(args.n_train)
    result.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["speed_vs_chgnet"]), f"\nwrote {result}")


if __name__ == "__main__":
    main()
