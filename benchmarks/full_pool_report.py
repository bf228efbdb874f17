"""Markdown tables of the full-pool results (BENCHMARKS.md section 0), from the results files only.

    python benchmarks/full_pool_report.py      # reads benchmarks/results/full_pool/*.json and speed.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


#: BaLoRA's prior weight beta at 10,000 crystals on the chosen recipe, with LoRA at the same size
BETA = {"0": "balora_beta0_10k", "0.01": "balora_curve_10k", "0.1": "balora_beta0.1_10k", "1": "balora_beta1_10k", "LoRA": "lora_curve_10k"}


def beta_table(results: dict) -> str:
    lines = ["| beta | run | MAE all / non-metals (eV) | Spearman all / non-metals | 90 % coverage | mean log a | noise ratios at the ceiling | best val MAE |",
             "|---|---|---|---|---|---|---|---|"]
    runs = results.get("runs", {})
    for beta, name in BETA.items():
        if name not in runs:
            continue
        r, noise = runs[name], runs[name].get("noise") or {}
        lines.append(f"| {beta} | {name} | {_f(r['all']['mae'])} / {_f(r['nonmetal']['mae'])} | {_f(r['all']['spearman'])} / {_f(r['nonmetal']['spearman'])} | "
                     f"{_f(r['all']['coverage_90'], 2)} | {_f(noise.get('log_a_mean'), 2)} | {_f(noise.get('fraction_at_ceiling'), 2)} | {_f(r.get('best_val_mae'))} |")
    return "\n".join(lines)


#: where the adapters go and on which backbone, at 10,000 crystals on the chosen recipe
PLACEMENT = {"CHGNet 0.3.0, last block": ("lora_curve_10k", "balora_curve_10k"),
             "CHGNet 0.3.0, last two blocks": ("lora_2blocks_10k", "balora_2blocks_10k"),
             "SevenNet-0, last interaction block": ("sevennet_lora_10k_seed0", "sevennet_balora_10k")}


def placement_table(results: dict) -> str:
    lines = ["| backbone, adapted blocks | method | MAE all / non-metals (eV) | Spearman all / non-metals | 90 % coverage | best val MAE | train s | ms per crystal per epoch |",
             "|---|---|---|---|---|---|---|---|"]
    runs = results.get("runs", {})
    for where, names in PLACEMENT.items():
        for method, name in zip(("LoRA", "BaLoRA"), names):
            if name not in runs:
                continue
            r = runs[name]
            lines.append(f"| {where} | {method} | {_f(r['all']['mae'])} / {_f(r['nonmetal']['mae'])} | {_f(r['all']['spearman'])} / {_f(r['nonmetal']['spearman'])} | "
                         f"{_f(r['all']['coverage_90'], 2)} | {_f(r.get('best_val_mae'))} | {_f(r.get('train_seconds'), 0)} | {_f(r.get('ms_per_crystal_epoch'), 1)} |")
    return "\n".join(lines)


#: learning-curve points: method -> run names at 2k, 10k, 40k and the full pool (one epoch), and the
#: full-pool warm restarts (three and five epochs, and the widened two-block runs)
CURVE = {"lora": ["lora_curve_2k", "lora_curve_10k", "lora_curve_40k", "lora_full_seed0"],
         "balora": ["balora_curve_2k", "balora_curve_10k", "balora_curve_40k", "balora_full"],
         "lora, 3 epochs": ["lora_full_3ep_seed0"],
         "balora, 3 epochs": ["balora_full_3ep"],
         "balora, 5 epochs": ["balora_full_5ep"],
         "lora, 4 epochs (last in two blocks)": ["lora_full_2blocks_4ep_seed0"],
         "balora, 6 epochs (last in two blocks)": ["balora_full_2blocks_6ep"],
         "balora, 7 epochs (last two in two blocks)": ["balora_full_2blocks_7ep"],
         "balora, 8 epochs (last three in two blocks)": ["balora_full_2blocks_8ep"],
         "balora, 9 epochs (last four in two blocks)": ["balora_full_2blocks_9ep"]}


def curve_points(results: dict, forest: dict) -> dict:
    """method -> [(training crystals, test MAE all, test MAE non-metals)] of the runs that finished."""
    runs = results.get("runs", {})
    out = {m: [(runs[n]["n_train"], runs[n]["all"]["mae"], runs[n]["nonmetal"]["mae"]) for n in names if n in runs] for m, names in CURVE.items()}
    out["magpie forest"] = sorted((r["n_train"], r["all"]["mae"], r["nonmetal"]["mae"]) for r in forest.values())
    return {m: pts for m, pts in out.items() if pts}


def curve_table(points: dict) -> str:
    lines = ["| method | training crystals | test MAE all / non-metals (eV) |", "|---|---|---|"]
    for method, pts in points.items():
        lines += [f"| {method} | {n} | {_f(a)} / {_f(b)} |" for n, a, b in pts]
    return "\n".join(lines)


def plot_curve(points: dict, path: Path) -> Path:
    """Test MAE against training crystals (log x), all crystals solid, non-metals dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9.6, 4.2))
    colors = plt.get_cmap("tab20").colors  # one per method: a shorter list would drop the last methods from the plot
    if len(points) > len(colors):
        raise ValueError(f"plot_curve: {len(points)} methods, {len(colors)} colours")
    for (method, pts), color in zip(points.items(), colors):
        n, a, b = (np.array(v, float) for v in zip(*pts))
        ax.plot(n, a, "o-", color=color, label=f"{method}, all")
        ax.plot(n, b, "s--", color=color, alpha=0.7, label=f"{method}, non-metals")
    ax.set(xscale="log", xlabel="training crystals (nested subsets of one permutation)", ylabel="test MAE (eV), 1,000 Matbench fold-0 crystals",
           title="Learning curve (full-pool recipe)")
    ax.set_xticks([2000, 10_000, 40_000, 82_111], ["2k", "10k", "40k", "82k (full)"], minor=False)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: eight methods would hide the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    results, forest, claims = _load(FULL / "results.json"), _load(FULL / "forest.json"), _load(FULL / "claims.json")
    print(runs_table(results, forest), "", classes_table(results), "", claims_table(claims), "", beta_table(results), "", placement_table(results), sep="\n")
    points = curve_points(results, forest)
    print("", curve_table(points), f"\nlearning curve plot: {plot_curve(points, FULL / 'learning_curve.png')}", sep="\n")
    if claims:
        print("\nepistemic-only ranking", claims.get("spearman_epistemic_only"), "aleatoric-only", claims.get("spearman_aleatoric_only"))
        print("noise", claims.get("noise"), "\nms per crystal per epoch", claims.get("ms_per_crystal_epoch"), "\nparameters", claims.get("parameters"))
    epoch = _load(RESULTS / "speed.json").get("training_epoch")
    if epoch:
        print("\nepoch speed", json.dumps({k: epoch[k] for k in ("lora", "balora", "fp16_storage_cost", "store_bytes_per_crystal", "fp32_prefix_bytes_per_crystal")}, indent=1))


if __name__ == "__main__":
    main()
