"""Dataset summaries (for ``matbalora data info PATH``): counts, gap and size statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from matbalora.data.dataset import BandGapDataset

PERCENTILES = (10, 25, 75, 90)


def _stats(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    out = {
        "min": float(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }
    out.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    return out


def summarize(dataset: BandGapDataset, *, metal_threshold: float = 0.0) -> dict[str, Any]:
    """Plain-dict summary of ``dataset``.

    Keys: ``count``, ``n_with_target``, ``n_rejected``, ``rejections`` (per reason),
    ``metal_fraction`` (share of known gaps <= ``metal_threshold`` eV; None without targets),
    ``band_gap`` (eV: min/median/mean/max/p10/p25/p75/p90 and ``median_nonzero``),
    ``atoms`` (per structure: min/median/mean/max/...), ``elements`` (sorted symbols),
    ``source``.
    """
    gaps = dataset.targets[np.isfinite(dataset.targets)]
    sizes = np.array([len(s) for s in dataset.structures], dtype=np.float64)
    elements: set[str] = set()
    for structure in dataset.structures:
        elements.update(el.symbol for el in structure.composition.elements)
    gap_stats = _stats(gaps)
    if gap_stats is not None:
        nonzero = gaps[gaps > metal_threshold]
        gap_stats["median_nonzero"] = float(np.median(nonzero)) if nonzero.size else None
    return {
        "source": dataset.provenance.get("source"),
        "count": len(dataset),
        "n_with_target": int(gaps.size),
        "n_rejected": len(dataset.rejected),
        "rejections": dataset.rejection_counts(),
        "metal_fraction": float(np.mean(gaps <= metal_threshold)) if gaps.size else None,
        "band_gap": gap_stats,
        "atoms": _stats(sizes),
        "elements": sorted(elements),
    }


def _line(label: str, stats: dict[str, float] | None, fmt: str) -> str:
    if stats is None:
        return f"{label}: n/a"
    order = ["min", "p10", "p25", "median", "mean", "p75", "p90", "max", "median_nonzero"]
    parts = [f"{k} {format(stats[k], fmt)}" for k in order if stats.get(k) is not None]
    return f"{label}: " + ", ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of a ``summarize`` result."""
    lines = [f"source: {summary.get('source')}"]
    lines.append(f"structures: {summary['count']:,} ({summary['n_with_target']:,} with a band gap)")
    rejections = summary.get("rejections") or {}
    detail = ", ".join(f"{k} {v:,}" for k, v in rejections.items())
    lines.append(f"rejected: {summary['n_rejected']:,}" + (f" ({detail})" if detail else ""))
    metal = summary.get("metal_fraction")
    lines.append("metals (gap 0): n/a" if metal is None else f"metals (gap 0): {100 * metal:.1f} %")
    lines.append(_line("band gap, eV", summary.get("band_gap"), ".4g"))
    lines.append(_line("atoms per structure", summary.get("atoms"), ".4g"))
    elements = summary.get("elements") or []
    lines.append(f"elements ({len(elements)}): {' '.join(elements)}")
    return "\n".join(lines)
