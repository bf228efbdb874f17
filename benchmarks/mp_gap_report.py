"""Report stage of benchmarks/mp_gap.py: the tables of BENCHMARKS.md, generated from
benchmarks/results/mp_gap.json (the text between the table markers is replaced; the verdicts
around it are written by people who read the numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

ORDER = ["head", "head_gated", "lora", "lora_gated", "balora", "balora_per_row", "balora_beta0", "mc_dropout", "lora_ensemble",
         "lora_all_blocks", "balora_all_blocks", "lora_ensemble_all_blocks", "full", "composition_baseline", "composition_baseline_large"]


def markers(section: str) -> tuple[str, str]:
    return f"<!-- {section}:tables -->", f"<!-- /{section}:tables -->"
MAIN_COLUMNS = [("mae", "MAE", 3), ("rmse", "RMSE", 3), ("r2", "R²", 3), ("spearman", "Spearman", 3), ("nll", "NLL", 2),
                ("miscalibration_area", "miscal. area", 3), ("ence", "ENCE", 3), ("coverage_90_uncalibrated", "cov90 raw", 2),
                ("coverage_90", "cov90 scaled", 2), ("coverage_90_conformal", "cov90 conformal", 2),
                ("mean_interval_width_90", "width90", 2), ("auc_sparsification_error", "AUSE", 3)]
NONMETAL_COLUMNS = [("nonmetal_mae", "MAE", 3), ("nonmetal_spearman", "Spearman", 3), ("nonmetal_nll", "NLL", 2),
                    ("nonmetal_coverage_90", "cov90 scaled", 2), ("nonmetal_miscalibration_area", "miscal. area", 3)]
COST_COLUMNS = [("trainable_params", "trainable params", 0), ("trainable_share", "share", 4), ("epochs", "epochs", 0),
                ("train_seconds", "train s", 0), ("seconds_per_epoch", "s/epoch", 0), ("ms_per_structure_step", "train ms/crystal", 0),
                ("best_val_mae", "val MAE", 3), ("predict_ms_per_structure", "predict ms/crystal", 1), ("samples", "S", 0),
                ("n_train", "n_train", 0), ("std_scale", "std scale", 3), ("std_floor", "std floor (eV)", 3)]


def noise_table(res: dict) -> str:
    rows = ["| log a offset | mean log a | MAE | Spearman | non-metal Spearman | median raw std (eV) |", "|---|---|---|---|---|---|"]
    sweep_ = res.get("noise_sweep", {})
    for off, r in sweep_.get("offsets", {}).items():
        rows.append(f"| {off} | {r['log_a_mean']:.2f} | {r['mae']:.3f} | {r['spearman']:.3f} | {r['nonmetal_spearman']:.3f} | {r['median_raw_std']:.2e} |")
    return f"On the first {sweep_.get('crystals')} test crystals, {sweep_.get('samples')} draws, no recalibration:\n\n" + "\n".join(rows)


def with_derived(methods: dict, n_train: int) -> dict:
    """Per-epoch and per-crystal training times from the totals (validation passes included)."""
    out = {}
    for name, row in methods.items():
        row = dict(row)
        if row.get("epochs") and row.get("train_seconds"):
            row["seconds_per_epoch"] = row["train_seconds"] / row["epochs"]
            row["ms_per_structure_step"] = 1000 * row["seconds_per_epoch"] / n_train
        out[name] = row
    return out


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if digits == 0:
        return f"{int(round(v)):,}"
    if digits == 4:
        return f"{100 * v:.2f}%"
    return f"{v:.{digits}f}"


def table(methods: dict, columns: list) -> str:
    names = [m for m in ORDER if m in methods] + [m for m in methods if m not in ORDER]
    lines = ["| method | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        row = methods[name]
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(key), d) for key, _, d in columns) + " |")
    return "\n".join(lines)


def sweep(res: dict, key: str, label: str) -> str:
    cols = list(res.get(key, {}))
    lines = [f"| {label} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for metric in ("spearman", "nll", "mae"):
        k = key.replace("spearman", metric)
        if k in res:
            lines.append(f"| {metric} | " + " | ".join(_fmt(res[k].get(c), 3) for c in cols) + " |")
    return "\n".join(lines)


def recalibration_note(methods: dict) -> str:
    """How the "scaled" stds of the tables were recalibrated (results written before the floor have none)."""
    if any(row.get("std_floor") is not None for row in methods.values()):
        return "stds recalibrated on validation as sqrt((k std)² + c²), scale k and floor c in the cost table; conformal on the recalibrated std"
    return "stds after std scaling (one factor) fitted on validation"


def render(res: dict) -> str:
    m = with_derived(res["methods"], res["n_train"])
    parts = [
        f"Test: {res['n_test']} crystals (metal fraction {res['test_metal_fraction']:.2f}); train {res['n_train']}, "
        f"validation {res['n_val']}. Produced by `{res['command']}`.",
        "", f"**All test crystals** (eV; {recalibration_note(m)}; cov90 = coverage of the 90% interval)", "",
        table(m, MAIN_COLUMNS),
        "", "**Non-metals only** (DFT gap > 0)", "", table(m, NONMETAL_COLUMNS),
        "", "**Cost**", "", table(m, COST_COLUMNS),
        "", "**BaLoRA vs test-time samples S** (the first S of the same draws)", "", sweep(res, "spearman_vs_samples", "S"),
        "", "**LoRA ensemble vs members K**", "", sweep(res, "spearman_vs_members", "K"),
    ]
    if "spearman_vs_samples_all_blocks" in res:
        parts += ["", "**Adapters in every block: BaLoRA vs S, ensemble vs K**", "", sweep(res, "spearman_vs_samples_all_blocks", "S"),
                  "", sweep(res, "spearman_vs_members_all_blocks", "K")]
    parts += ["", "**Where the BaLoRA noise went** (learned log a over all adapted layers)", ""]
    for name in [n for n in ORDER if m.get(n, {}).get("noise")]:
        parts += [f"{name}:", "```", json.dumps(m[name]["noise"], indent=None), "```"]
    parts += [
        "", "**Diagnostic: the trained BaLoRA model with its noise raised at test time**", "", noise_table(res),
    ]
    return "\n".join(parts)


def stage_report(results: Path, doc: Path, section: str = "mp_gap") -> None:
    START, END = markers(section)
    res = json.loads(results.read_text())
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    from matbalora.atomic import write_text

    write_text(doc, head + START + "\n" + render(res) + "\n" + END + tail)
    print(f"tables written into {doc}")
