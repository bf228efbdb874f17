"""Training epochs on cached frozen features, before and after issue 14 (part of ``benchmarks/speed.py``).

    OMP_NUM_THREADS=1 python benchmarks/speed.py --only epoch --n 192

Variants, run back to back on the same real crystals (each one epoch of ``fit``, minimum of the
rounds), for LoRA and BaLoRA at the default placement (last block), batch 32:

* ``list_fp32``: in-memory fp32 ``PrefixGraph`` objects collated per batch, float32 compute with
  the adapters in activation space (the path before issue 14);
* ``store_fp32``: the same crystals from an on-disk fp16/int32 prefix store (vectorised gather),
  float32 compute;
* ``store_bf16``: from the store, ``compute_dtype="bfloat16"`` (adapted block in bf16, adapter
  update folded into the weight).

And, by ``speed.py --only layer``, one adapted bond layer's bf16 training step (``grouped_layer_ratio``: forward + backward of
CHGNet's 192 -> 64 ``twoBody_atom`` linear on the directed-bond rows of 32 of these crystals, per-crystal
BaLoRA draws): one matmul per crystal (the loop before) vs one grouped GEMM, against LoRA's folded weight.

Also measured: what fp16 storage costs in predictions (|gap from the fp16 store - gap from fp32
prefixes|, deterministic pass of the shipped BaLoRA model).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from matbalora.backbones.chgnet import FAMILY as CHGNET
from matbalora.backbones.prefix_store import PrefixStore, StoreBatches, build_prefix_store
from matbalora.config import TrainConfig
from matbalora.model import BandGapModel
from matbalora.training import ListBatches, fit

VARIANTS = ("list_fp32", "store_fp32", "store_bf16")


def _epoch_seconds(method: str, source, val, dtype: str) -> float:
    torch.manual_seed(0)
    model = BandGapModel.from_pretrained(method)
    t0 = time.perf_counter()
    fit(model, source, val, TrainConfig(method=method, epochs=1, batch_size=32, compute_dtype=dtype), progress=False)
    return time.perf_counter() - t0


def epoch_ratio(graphs: list, targets: np.ndarray, *, rounds: int = 2) -> dict:
    """ms per crystal per epoch of each variant, and the speed-up of ``store_bf16`` over ``list_fp32``."""
    backbone = BandGapModel.from_pretrained("balora").backbone
    prefixes = CHGNET.compute_prefixes(backbone, graphs, backbone.n_conv - 1, progress=False)
    ids = [f"c{i}" for i in range(len(prefixes))]
    root = tempfile.mkdtemp(prefix="matbalora-speed-store-")
    build_prefix_store(root, ids=ids, load_shard=lambda pos: ([prefixes[p] for p in pos], [float(targets[p]) for p in pos], [ids[p] for p in pos], {}),
                       key="speed", block=backbone.n_conv - 1, shard_size=64, progress=False)
    store = PrefixStore(root)
    val = (prefixes[:2], targets[:2])  # validation is not what is timed
    sources = {"list_fp32": (lambda: ListBatches(prefixes, targets), "float32"), "store_fp32": (lambda: StoreBatches(store, ids), "float32"),
               "store_bf16": (lambda: StoreBatches(store, ids), "bfloat16")}
    out: dict = {"n_crystals": len(prefixes), "rounds": rounds, "store_bytes_per_crystal": store.nbytes() / len(prefixes),
                 "fp32_prefix_bytes_per_crystal": float(np.mean([p.nbytes() for p in prefixes]))}
    for method in ("lora", "balora"):
        best = {v: float("inf") for v in VARIANTS}
        for _ in range(rounds):
            for v in VARIANTS:
                make, dtype = sources[v]
                best[v] = min(best[v], _epoch_seconds(method, make(), val, dtype))
        out[method] = {f"{v}_ms_per_crystal": 1e3 * best[v] / len(prefixes) for v in VARIANTS}
        out[method]["speedup_store_bf16_over_list_fp32"] = best["list_fp32"] / best["store_bf16"]
        out[method]["speedup_store_fp32_over_list_fp32"] = best["list_fp32"] / best["store_fp32"]
    out["fp16_storage_cost"] = fp16_cost(store, ids, prefixes)
    return out


def grouped_layer_ratio(counts: list[int], rounds: int = 15) -> dict:
    """ms per bf16 training step of one adapted 192 -> 64 linear on ``counts`` rows per crystal: LoRA
    (folded weight), BaLoRA per-crystal draws folded per crystal by a loop of matmuls and by
    :func:`matbalora.adapters.grouped_matmul` (median over ``rounds`` of the three back to back; the
    ratios are medians of the per-round ratios, so a load change hits both sides of a ratio)."""
    from matbalora.adapters import grouped_matmul

    torch.manual_seed(0)
    dt, d_in, d_out, rank = torch.bfloat16, 192, 64, 8
    x = torch.randn(sum(counts), d_in, dtype=dt, requires_grad=True)
    w0, bias, eps = torch.randn(d_out, d_in) / 14, torch.randn(d_out), torch.randn(len(counts), rank, d_in)
    m, b = torch.randn(rank, d_in, requires_grad=True), torch.randn(d_out, rank, requires_grad=True)
    ratio = torch.full((rank,), 0.05, requires_grad=True)
    grad = torch.randn(sum(counts), d_out, dtype=dt)

    def folded_weights():  # [C, d_in, d_out]
        return (w0 + torch.matmul(b, m + (m * ratio[:, None]) * eps)).to(dt).transpose(1, 2)

    def lora():
        return torch.autograd.grad(torch.nn.functional.linear(x, (w0 + b @ m).to(dt), bias.to(dt)), (x, m, b), grad)

    def loop():
        y = torch.cat([seg @ w for seg, w in zip(torch.split(x, counts), folded_weights().unbind(0))]) + bias.to(dt)
        return torch.autograd.grad(y, (x, m, b, ratio), grad)

    def grouped():
        return torch.autograd.grad(grouped_matmul(x, counts, folded_weights()) + bias.to(dt), (x, m, b, ratio), grad)

    variants = {"lora_folded": lora, "balora_loop": loop, "balora_grouped": grouped}
    ms = {name: [] for name in variants}
    for i in range(rounds + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                ms[name].append(1e3 * (time.perf_counter() - t0))
    t = {k: np.array(v) for k, v in ms.items()}
    return {"rows": sum(counts), "crystals": len(counts), "rounds": rounds, **{f"{k}_ms_median": float(np.median(v)) for k, v in t.items()},
            "speedup_grouped_over_loop": float(np.median(t["balora_loop"] / t["balora_grouped"])),
            "balora_grouped_over_lora": float(np.median(t["balora_grouped"] / t["lora_folded"]))}


def fp16_cost(store: PrefixStore, ids: list[str], prefixes: list) -> dict:
    """Deterministic gaps of the shipped BaLoRA model from the fp16 store vs from fp32 prefixes (eV)."""
    from matbalora.api import load_model

    model = load_model().model
    from16 = model.sample_gaps(store.prefix_graphs(ids), samples=0).gaps.mean(0)
    from32 = model.sample_gaps(prefixes, samples=0).gaps.mean(0)
    diff = np.abs(from16 - from32)
    return {"model": "models/balora", "max_abs_gap_difference_eV": float(diff.max()), "mean_abs_gap_difference_eV": float(diff.mean())}


def real_crystals(path, n: int) -> tuple[list, np.ndarray]:
    """CHGNet graphs and PBE gaps (eV) of the first ``n`` admitted crystals of ``path``."""
    from matbalora.data.formats import file_entries
    from matbalora.data.validation import DEFAULT_MAX_ATOMS, check_structure

    backbone = BandGapModel.from_pretrained("balora").backbone
    graphs, targets = [], []
    for e in file_entries(path, id_key="material_id", target_key="band_gap", limit=n + 50, max_atoms=DEFAULT_MAX_ATOMS):
        if e.structure is None or check_structure(e.structure) is not None or len(graphs) >= n:
            continue
        graphs.append(backbone.graph_converter(e.structure))
        targets.append(float(e.target))
    return graphs, np.array(targets)
