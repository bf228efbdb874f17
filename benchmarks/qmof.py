"""BaLoRA vs the LoRA ensemble on MOF band gaps (QMOF, the paper's own domain), issue 9 part 1.

    OMP_NUM_THREADS=1 python benchmarks/qmof.py [--n-train 600] [--n-val 200] [--n-test 400] [--epochs 6]

A seeded random split of ``../shared/data/qmof/qmof.extxyz.gz`` (sizes in the results); CHGNet 0.3.0
with the default last-block adapters (frozen features cached once and shared by every model),
methods ``lora`` (seeds 0-4, the ensemble), ``balora`` and the Magpie random forest; each model's card holds its own metrics (std scaling and conformal intervals fitted
on validation). Resumable: finished models are skipped. Writes benchmarks/results/qmof.json.
Not run here, for CPU time: the frozen-backbone head, full fine-tuning (an epoch over MOFs costs ~10x an MP epoch on the 2-core
CPU) and MC dropout (its 16 passes cannot share the adapter folding).
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

from matbalora.atomic import write_json  # noqa: E402
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig  # noqa: E402
from matbalora.data.entries import build_dataset  # noqa: E402
from matbalora.data.extxyz import read_extxyz  # noqa: E402
from matbalora.data.formats import atoms_entry  # noqa: E402
from matbalora.data.graph_cache import GraphCache  # noqa: E402
from matbalora.data.splits import random_split  # noqa: E402
from matbalora.finetune import PreparedData, calibrate_and_score, default_cache_dir, train_model, with_frozen_prefix  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402
from matbalora.predict import EnsemblePredictor, Predictor  # noqa: E402

QMOF = REPO.parent / "shared" / "data" / "qmof" / "qmof.extxyz.gz"
RUNS = REPO / "runs" / "qmof"
SEEDS = [0, 1, 2, 3, 4]
METHODS = {
    "balora": ("balora", AdapterConfig(bayesian=True), HeadConfig(), 0),
    **{f"lora_seed{s}": ("lora", AdapterConfig(), HeadConfig(), s) for s in SEEDS},
}
KEYS = ("mae", "rmse", "spearman", "nll", "miscalibration_area", "coverage_90", "nonmetal_mae", "nonmetal_spearman")


def load(n_train: int, n_val: int, n_test: int, model: BandGapModel) -> PreparedData:
    frames = read_extxyz(QMOF)
    rows = np.sort(np.random.default_rng(0).choice(len(frames), n_train + n_val + n_test, replace=False))
    entries = (atoms_entry(frames[i], str(frames[i].info["material_id"]), target_key="band_gap", max_atoms=500) for i in rows)
    ds = build_dataset(entries, provenance={"source": str(QMOF), "protocol": "seeded random subset, seed 0", "n_drawn": len(rows)})
    n = len(ds)
    split = random_split(n, fractions=(n_train / len(rows), n_val / len(rows), n_test / len(rows)), seed=0)
    cache = GraphCache(default_cache_dir(), converter=model.backbone.graph_converter, backbone_version=model.backbone_version)
    graphs = cache.graphs(ds.structures, ids=ds.ids, workers=1, progress=True)
    return PreparedData(ids=list(ds.ids), formulas=[s.composition.reduced_formula for s in ds.structures], n_atoms=[len(s) for s in ds.structures],
                        targets=ds.targets, graphs=graphs, split=split, provenance=dict(ds.provenance, rejected=ds.rejection_counts(), n_loaded=n))


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
    k = StdScaler().fit(vm, vs, data.targets[data.split.val]).factor
    tm, ts = predict("test")
    return evaluate(tm, ts * k, data.targets[data.split.test])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    probe = BandGapModel.from_pretrained("lora")
    data = load(args.n_train, args.n_val, args.n_test, probe)
    trained = all((RUNS / name / "config.json").is_file() for name in METHODS)
    parts = ("val", "test") if trained else ("train", "val", "test")  # a rerun after training only scores
    data = with_frozen_prefix(data, probe, parts=parts)  # shared by every model below (all freeze the same prefix)
    print(f"data ready in {time.perf_counter() - t0:.0f}s: {data.split.sizes()}", flush=True)
    out = {"command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]), "split": data.split.sizes(),
           "atoms_mean": float(np.mean(data.n_atoms)), "test_metal_fraction": float(np.mean(data.targets[data.split.test] == 0)),
           "epochs": args.epochs, "methods": {}}
    for name, (method, adapter, head, seed) in METHODS.items():
        folder = RUNS / name
        if not (folder / "config.json").is_file():
            cfg = TrainConfig(method=method, epochs=args.epochs, seed=seed, patience=args.epochs)
            train_model(None, folder, train=cfg, adapter=adapter, head=head, data=data, resume=(folder / "checkpoint").is_dir(), progress=False)
        card = json.loads((folder / "config.json").read_text())
        out["methods"][name] = {k: card["metrics"]["test"].get(k) for k in KEYS} | {"train_seconds": card["training"]["train_seconds"],
                                                                                 "coverage_90_uncalibrated": card["metrics"]["test_uncalibrated"].get("coverage_90")}
        print(name, out["methods"][name], flush=True)
    ensemble = EnsemblePredictor([Predictor.load(RUNS / f"lora_seed{s}") for s in SEEDS])
    _, metrics = calibrate_and_score(ensemble, data, samples=0)
    out["methods"]["lora_ensemble"] = {k: metrics["test"].get(k) for k in KEYS} | {"coverage_90_uncalibrated": metrics["test_uncalibrated"].get("coverage_90")}
    out["methods"]["lora"] = out["methods"].pop("lora_seed0")
    for s in SEEDS[1:]:
        out["methods"].pop(f"lora_seed{s}")
    out["methods"]["composition_baseline"] = {k: v for k, v in composition_baseline(data).items() if k in KEYS}
    out["wall_seconds"] = time.perf_counter() - t0
    write_json(REPO / "benchmarks" / "results" / "qmof.json", out)
    print(json.dumps({k: {m: v.get(m) for m in ("mae", "spearman", "nonmetal_spearman", "coverage_90")} for k, v in out["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
