"""Transfer of the MP-trained models to metal-organic frameworks (issue 9, part 1: the transfer half).

    OMP_NUM_THREADS=1 python benchmarks/qmof_transfer.py [--n 300] [--model models/balora] [--ensemble models/lora_ensemble]

The shipped BaLoRA model and LoRA ensemble (trained on Materials Project crystals only) predict
``--n`` QMOF frameworks (a seeded subset of ../shared/data/qmof) and the first ``--n`` of the mp_gap
benchmark's test crystals. Reported per model: MAE and Spearman(|error|, std) on each set, and the
ratio of the median predicted std on MOFs to that on MP test crystals (an uncertainty that notices
the domain shift should rise: ratio > 1). Writes benchmarks/results/qmof_transfer.json.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mp_gap_data import REPO, SplitSizes, load_benchmark_data  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.predict import EnsemblePredictor, Predictor, prepare  # noqa: E402

QMOF = REPO.parent / "shared" / "data" / "qmof" / "qmof.extxyz.gz"


def qmof_subset(n: int, seed: int = 0):
    """``n`` seeded QMOF frames as pymatgen Structures with their ids and PBE gaps."""
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    with gzip.open(QMOF, "rt") as fh:  # decompressed in memory: ASE seeking in a gzip stream is slow
        frames = read(io.StringIO(fh.read()), index=":", format="extxyz")
    rows = np.sort(np.random.default_rng(seed).choice(len(frames), n, replace=False))
    structs = [AseAtomsAdaptor.get_structure(frames[i]) for i in rows]
    return structs, [str(frames[i].info["material_id"]) for i in rows], np.array([float(frames[i].info["band_gap"]) for i in rows])


def score(frame, y: np.ndarray) -> dict:
    ok = frame["error"].fillna("").eq("").to_numpy() if "error" in frame else np.ones(len(frame), bool)
    pred, std, y = frame["band_gap"].to_numpy()[ok], frame["std"].to_numpy()[ok], y[ok]
    err = np.abs(pred - y)
    nonmetal = y > 0
    return {"n": int(ok.sum()), "mae": float(err.mean()), "spearman": float(spearmanr(err, std)[0]),
            "nonmetal_spearman": float(spearmanr(err[nonmetal], std[nonmetal])[0]) if nonmetal.sum() > 2 else None,
            "median_std": float(np.median(std)), "median_abs_error": float(np.median(err)), "mean_gap_true": float(y.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "balora")
    ap.add_argument("--ensemble", type=Path, default=REPO / "models" / "lora_ensemble")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qmof_transfer.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    balora, ensemble = Predictor.load(args.model), EnsemblePredictor.load(args.ensemble)
    mofs, mof_ids, y_mof = qmof_subset(args.n)
    mp = load_benchmark_data(SplitSizes(n_train=1, n_val=1, n_test=1000, seed=0), balora.model, progress=False)
    test = mp.split.test[: args.n]
    y_mp = mp.targets[test]
    prep_mp = mp.part("test")
    prep_mp = type(prep_mp)(**{**prep_mp.__dict__, **{k: getattr(prep_mp, k)[: args.n] for k in ("ids", "formulas", "n_atoms", "errors", "graphs")}, "graph_rows": list(range(len(test)))})
    prep_mof = prepare(balora.model, mofs, ids=mof_ids)
    out = {"command": "OMP_NUM_THREADS=1 " + " ".join(["python", *sys.argv]), "n": args.n, "samples": args.samples,
           "models": {"balora": str(args.model.relative_to(REPO)) if args.model.is_relative_to(REPO) else str(args.model),
                      "ensemble": str(args.ensemble.relative_to(REPO)) if args.ensemble.is_relative_to(REPO) else str(args.ensemble)},
           "qmof_atoms_mean": float(np.mean([len(s) for s in mofs])), "results": {}}
    for name, pred in (("balora", balora), ("lora_ensemble", ensemble)):
        t1 = time.perf_counter()
        f_mp = pred.predict_prepared(prep_mp, samples=args.samples)
        f_mof = pred.predict_prepared(prep_mof, samples=args.samples)
        s_mp, s_mof = score(f_mp, y_mp), score(f_mof, y_mof)
        out["results"][name] = {"mp_test": s_mp, "qmof": s_mof, "median_std_ratio_qmof_over_mp": s_mof["median_std"] / s_mp["median_std"],
                                "seconds": time.perf_counter() - t1}
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in out["results"][name].items() if k != "seconds"}, flush=True)
    out["wall_seconds"] = time.perf_counter() - t0
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
