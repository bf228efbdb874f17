"""BaLoRA vs the LoRA ensemble and the usual baselines on MOF band gaps (QMOF, the paper's own domain), issue 9 part 1.

    OMP_NUM_THREADS=1 python benchmarks/qmof.py [--n-train 600] [--n-val 200] [--n-test 400] [--epochs 6]
                                                [--full-train 300] [--full-epochs 3]

A seeded random split of ``../shared/data/qmof/qmof.extxyz.gz`` (sizes in the results); CHGNet 0.3.0
with the default last-block adapters (frozen features cached once and shared by every model below
but ``full``). Methods and their configs are those of ``benchmarks/mp_gap.py``: ``lora`` (seeds 0-4,
the ensemble), ``balora``, the frozen-backbone ``head``, ``mc_dropout`` (LoRA + dropout 0.1, 16
passes) and ``full`` fine-tuning; full fine-tuning runs the whole backbone every step (~85 atoms per
MOF), so it trains on a seeded subset of ``--full-train`` of the training MOFs for ``--full-epochs``
(same validation and test sets). References: the Magpie random forest (same training MOFs) and the
train-mean / train-median constants. Each model's card holds its own metrics (std scaling and
conformal intervals fitted on validation, by the calibration code current when the model was trained:
cards written before the scale + floor recalibration hold scale-only metrics). Resumable: finished models are skipped. Models go to
runs/qmof (default sizes) or runs/qmof_<train>_<val>_<test>_e<epochs>; results to
benchmarks/results/qmof.json or qmof_<train>_<val>_<test>_e<epochs>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mp_gap import METHODS as MP_GAP_METHODS  # noqa: E402
from mp_gap_data import REPO  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.config import HeadConfig, TrainConfig  # noqa: E402
from matbalora.data.entries import build_dataset  # noqa: E402
from matbalora.data.extxyz import read_extxyz  # noqa: E402
from matbalora.data.formats import atoms_entry  # noqa: E402
from matbalora.data.graph_cache import GraphCache  # noqa: E402
from matbalora.data.splits import Split, random_split  # noqa: E402
from matbalora.finetune import PreparedData, calibrate_and_score, default_cache_dir, train_model, with_frozen_prefix  # noqa: E402
from matbalora.metrics import mae, rmse  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402
from matbalora.predict import EnsemblePredictor, Predictor  # noqa: E402

QMOF = REPO.parent / "shared" / "data" / "qmof" / "qmof.extxyz.gz"
DEFAULT_SIZES = (600, 200, 400, 6)  # the first run (runs/qmof, benchmarks/results/qmof.json)
SEEDS = [0, 1, 2, 3, 4]
#: name -> (method, adapter config, head config, seed): the mp_gap benchmark's configs (full is trained apart, on raw graphs)
METHODS = {name: MP_GAP_METHODS[name][:4] for name in ("balora", *(f"lora_seed{s}" for s in SEEDS), "head", "mc_dropout")}
KEYS = ("mae", "rmse", "spearman", "nll", "miscalibration_area", "coverage_90", "nonmetal_mae", "nonmetal_spearman")


def load_dataset(n_train: int, n_val: int, n_test: int):
    """The seeded QMOF subset (validated structures) and its seeded random split."""
    frames = read_extxyz(QMOF)
    rows = np.sort(np.random.default_rng(0).choice(len(frames), n_train + n_val + n_test, replace=False))
    entries = (atoms_entry(frames[i], str(frames[i].info["material_id"]), target_key="band_gap", max_atoms=500) for i in rows)
    ds = build_dataset(entries, provenance={"source": str(QMOF), "protocol": "seeded random subset, seed 0", "n_drawn": len(rows)})
    split = random_split(len(ds), fractions=(n_train / len(rows), n_val / len(rows), n_test / len(rows)), seed=0)
    return ds, split


def load(n_train: int, n_val: int, n_test: int, model: BandGapModel) -> PreparedData:
    ds, split = load_dataset(n_train, n_val, n_test)
    cache = GraphCache(default_cache_dir(), converter=model.backbone.graph_converter, backbone_version=model.backbone_version)
    graphs = cache.graphs(ds.structures, ids=ds.ids, workers=1, progress=True)
    return PreparedData(ids=list(ds.ids), formulas=[s.composition.reduced_formula for s in ds.structures], n_atoms=[len(s) for s in ds.structures],
                        targets=ds.targets, graphs=graphs, split=split, provenance=dict(ds.provenance, rejected=ds.rejection_counts(), n_loaded=len(ds)))


def train_subset(data: PreparedData, n: int) -> PreparedData:
    """``data`` with a seeded subset of ``n`` of its training rows (validation and test unchanged)."""
    sub = np.sort(np.random.default_rng(0).choice(data.split.train, min(n, len(data.split.train)), replace=False))
    split = Split(train=sub, val=data.split.val, test=data.split.test, kind=f"{data.split.kind}/train subset {len(sub)} seed 0", seed=data.split.seed)
    return replace(data, split=split)


def constant_rows(data: PreparedData) -> dict:
    """Test metrics of predicting one constant from the training gaps (the mean; the median minimises L1)."""
    y_train, y_test = data.targets[data.split.train], data.targets[data.split.test]
    out = {}
    for name, c in (("train_mean", float(np.mean(y_train))), ("train_median", float(np.median(y_train)))):
        pred, std = np.full_like(y_test, c, dtype=float), np.zeros_like(y_test, dtype=float)
        out[name] = {"mae": mae(pred, std, y_test), "rmse": rmse(pred, std, y_test), "value": c}
    return out


def summary(folder: Path) -> dict:
    card = json.loads((folder / "config.json").read_text())
    t = card["training"]
    return {k: card["metrics"]["test"].get(k) for k in KEYS} | {
        "train_seconds": t["train_seconds"], "wall_seconds": t.get("wall_seconds_this_run"), "n_train": card["data"]["n_train"], "epochs": t["epochs_run"],
        "best_val_mae": t["best_val_mae"], "coverage_90_uncalibrated": card["metrics"]["test_uncalibrated"].get("coverage_90")}


def composition_baseline(data: PreparedData) -> dict:
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition
    from sklearn.ensemble import RandomForestRegressor

    from matbalora.calibration import StdScaler
    from matbalora.metrics import evaluate

    feat = ElementProperty.from_preset("magpie")

    def X(part):
        return np.nan_to_num(np.array([feat.featurize(Composition(data.formulas[i])) for i in getattr(data.split, part)], dtype=float))

    rf = RandomForestRegressor(n_estimators=100, n_jobs=1, random_state=0).fit(X("train"), data.targets[data.split.train])

    def predict(part):
        trees = np.stack([t.predict(X(part)) for t in rf.estimators_])
        return trees.mean(0), np.maximum(trees.std(0, ddof=1), 1e-6)

    vm, vs = predict("val")
    scaler = StdScaler().fit(vm, vs, data.targets[data.split.val], floor=True)
    tm, ts = predict("test")
    return evaluate(tm, scaler.transform(ts), data.targets[data.split.test])


def recalibrate_if_old(folder: Path, data: PreparedData) -> None:
    """Refit a stochastic model's recalibration (scale + floor) on validation when its card predates the floor."""
    card = json.loads((folder / "config.json").read_text())
    if "std_floor" in (card.get("calibration") or {}):
        return
    pred = Predictor.load(folder)
    if not (pred.model.is_bayesian or pred.model.has_dropout):
        return
    card["calibration"], card["metrics"] = calibrate_and_score(pred, data, samples=16)
    write_json(folder / "config.json", card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=DEFAULT_SIZES[0])
    ap.add_argument("--n-val", type=int, default=DEFAULT_SIZES[1])
    ap.add_argument("--n-test", type=int, default=DEFAULT_SIZES[2])
    ap.add_argument("--epochs", type=int, default=DEFAULT_SIZES[3])
    ap.add_argument("--full-train", type=int, default=300, help="training MOFs (seeded subset) for full fine-tuning")
    ap.add_argument("--full-epochs", type=int, default=3, help="epochs of full fine-tuning")
    args = ap.parse_args()
    sizes = (args.n_train, args.n_val, args.n_test, args.epochs)
    tag = "qmof" if sizes == DEFAULT_SIZES else "qmof_{}_{}_{}_e{}".format(*sizes)
    runs, result = REPO / "runs" / tag, REPO / "benchmarks" / "results" / f"{tag}.json"
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    probe = BandGapModel.from_pretrained("lora")
    raw = load(args.n_train, args.n_val, args.n_test, probe)
    trained = all((runs / name / "config.json").is_file() for name in METHODS)
    parts = ("val", "test") if trained else ("train", "val", "test")  # a rerun after training only scores
    data = with_frozen_prefix(raw, probe, parts=parts)  # shared by every model below but full (all freeze the same prefix)
    print(f"data ready in {time.perf_counter() - t0:.0f}s: {data.split.sizes()}", flush=True)
    out = {"command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]), "split": data.split.sizes(), "runs": str(runs.relative_to(REPO)),
           "atoms_mean": float(np.mean(raw.n_atoms)), "test_metal_fraction": float(np.mean(data.targets[data.split.test] == 0)),
           "epochs": args.epochs, "data_seconds": time.perf_counter() - t0, "threads": 1, "methods": {}}
    for name, (method, adapter, head, seed) in METHODS.items():
        folder = runs / name
        if not (folder / "config.json").is_file():
            cfg = TrainConfig(method=method, epochs=args.epochs, seed=seed, patience=args.epochs)
            train_model(None, folder, train=cfg, adapter=adapter, head=head, data=data, resume=(folder / "checkpoint").is_dir(), progress=False)
        recalibrate_if_old(folder, data)
        out["methods"][name] = summary(folder)
        print(name, out["methods"][name], flush=True)
    ensemble = EnsemblePredictor([Predictor.load(runs / f"lora_seed{s}") for s in SEEDS])
    _, metrics = calibrate_and_score(ensemble, data, samples=0)
    out["methods"]["lora_ensemble"] = {k: metrics["test"].get(k) for k in KEYS} | {"coverage_90_uncalibrated": metrics["test_uncalibrated"].get("coverage_90"),
                                                                                 "train_seconds": sum(out["methods"][f"lora_seed{s}"]["train_seconds"] for s in SEEDS)}
    out["methods"]["lora"] = out["methods"].pop("lora_seed0")
    for s in SEEDS[1:]:
        out["methods"].pop(f"lora_seed{s}")
    out["methods"]["composition_baseline"] = {k: v for k, v in composition_baseline(data).items() if k in KEYS}
    out["methods"] |= constant_rows(data)
    write_json(result, out)  # everything but full, in case full does not finish
    folder = runs / "full"
    if not (folder / "config.json").is_file():
        cfg = TrainConfig(method="full", epochs=args.full_epochs, seed=0, patience=args.full_epochs)
        train_model(None, folder, train=cfg, head=HeadConfig(), data=train_subset(raw, args.full_train), resume=(folder / "checkpoint").is_dir(), progress=False)
    out["methods"]["full"] = summary(folder)
    out["full_note"] = f"full fine-tuning on a seeded subset of {out['methods']['full']['n_train']} training MOFs for {out['methods']['full']['epochs']} epochs (CPU time); same validation and test MOFs"
    out["wall_seconds"] = time.perf_counter() - t0
    write_json(result, out)
    print(json.dumps({k: {m: v.get(m) for m in ("mae", "spearman", "nonmetal_spearman", "coverage_90")} for k, v in out["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
