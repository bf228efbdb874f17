"""Markdown tables of the full-pool results (BENCHMARKS.md section 0), from the results files only.

    python benchmarks/full_pool_report.py      # reads benchmarks/results/full_pool/*.json and speed.json
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FULL = RESULTS / "full_pool"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def runs_table(results: dict, forest: dict) -> str:
    lines = ["| model | training crystals | MAE all / non-metals (eV) | Spearman(\\|err\\|, std) all / non-metals | 90 % coverage (Gaussian) | mean 90 % width (eV) | val MAE by epoch → after head refit |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.get("runs", {}).items():
        a, n = r["all"], r["nonmetal"]
        val = " → ".join(_f(v) for v in r.get("val_mae_by_epoch", [])) + (f" → {_f(r['refit_val_mae'])}" if r.get("refit_val_mae") is not None else "")
        lines.append(f"| {name} | {r.get('n_train', '–')} | {_f(a['mae'])} / {_f(n['mae'])} | {_f(a['spearman'])} / {_f(n['spearman'])} | "
                     f"{_f(a['coverage_90'], 2)} | {_f(a['mean_interval_width_90'], 2)} | {val or '–'} |")
    for size, r in forest.items():
        a, n = r["all"], r["nonmetal"]
        lines.append(f"| Magpie random forest ({size}) | {r['n_train']} | {_f(a['mae'])} / {_f(n['mae'])} | {_f(a['spearman'])} / {_f(n['spearman'])} | "
                     f"{_f(a['coverage_90'], 2)} | {_f(a['mean_interval_width_90'], 2)} | – |")
    return "\n".join(lines)


def classes_table(results: dict) -> str:
    lines = ["| model | class (predicted) | n | coverage Gaussian → Mondrian | width Gaussian → Mondrian (eV) |", "|---|---|---|---|---|"]
    for name, r in results.get("runs", {}).items():
        for cls, c in (r.get("test_classes") or {}).items():
            lines.append(f"| {name} | {cls} | {c['n']} | {_f(c['coverage_90_gaussian'], 2)} → {_f(c['coverage_90_mondrian'], 2)} | "
                         f"{_f(c['width_90_gaussian'], 2)} → {_f(c['width_90_mondrian'], 2)} |")
    return "\n".join(lines)


def claims_table(claims: dict) -> str:
    lines = ["| test-time draws S | MAE | Spearman all | MAE non-metals | Spearman non-metals | median epistemic std (eV) |", "|---|---|---|---|---|---|"]
    for s, r in claims.get("samples", {}).items():
        lines.append(f"| {s} | {_f(r['mae'])} | {_f(r['spearman'])} | {_f(r['nonmetal_mae'])} | {_f(r['nonmetal_spearman'])} | {_f(r['median_std_epistemic'], 4)} |")
    return "\n".join(lines)


def main() -> None:
    results, forest, claims = _load(FULL / "results.json"), _load(FULL / "forest.json"), _load(FULL / "claims.json")
    print(runs_table(results, forest), "", classes_table(results), "", claims_table(claims), sep="\n")
    if claims:
        print("\nepistemic-only ranking", claims.get("spearman_epistemic_only"), "aleatoric-only", claims.get("spearman_aleatoric_only"))
        print("noise", claims.get("noise"), "\nms per crystal per epoch", claims.get("ms_per_crystal_epoch"), "\nparameters", claims.get("parameters"))
    epoch = _load(RESULTS / "speed.json").get("training_epoch")
    if epoch:
        print("\nepoch speed", json.dumps({k: epoch[k] for k in ("lora", "balora", "fp16_storage_cost", "store_bytes_per_crystal", "fp32_prefix_bytes_per_crystal")}, indent=1))


if __name__ == "__main__":
    main()
