"""Speed of prediction and screening: a profile of the predict path, then the issue-7 ratios.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --n 200 [--repeats 2] [--chunk 40] [--data PATH] [--out JSON]

All ratios come from one run on the same real crystals (the first ``--n`` admitted frames of the
shared mp_gap file) with the pretrained CHGNet 0.3.0 and BaLoRA adapters at the default placement
(the message-passing linears of the last block; random B and log a = -3, so the adapters are not a
no-op), compared where stated with adapters in every block (``last_blocks=0``). Timings that
are compared run back to back on each chunk of ``--chunk`` crystals (minimum of ``--repeats``
rounds per chunk, summed over chunks), so that the load changes of a shared machine hit every
variant alike; the load average is recorded too. Absolute times of a loaded 2-core machine mean
little; the ratios are the result.

1. Profile (ms per structure): parsing, validation, graph conversion (and a graph-cache hit),
   collation into batches, forward passes, DataFrame assembly.
2. (a) 16 Monte-Carlo samples vs one deterministic pass, forward only and end to end (structures
   in, table out; graph construction is shared by the draws), with the naive loop of 16 one-draw
   passes, and with adapters in every block (draws tiled from the first block). (b) deterministic
   throughput vs CHGNet's own batched energy prediction on the same graphs. (c) BaLoRA training
   step vs LoRA, same rank and targets, on cached frozen-prefix features (how training runs) and on
   CrystalGraphs; and the step with cached features vs from graphs, and with adapters in every
   block. (d) peak RSS predicting a
   1,000-atom supercell with 16 samples, with the row budget and with every draw in one pass, each
   in a fresh subprocess. (e) crystals per second through ``matbalora.screen`` with 16 samples.

Writes ``benchmarks/results/speed.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from matbalora.allocator import tune_cpu_allocator
from matbalora.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed.json"
BIG_ID, BIG_SUPERCELL = "mb-mp-gap-000010", (5, 5, 4)  # ZnSiO3, 10 atoms -> 1,000 (dense: ~200 rows/atom)
TRAIN_BATCH = 32
MEMORY_CAP = 10 * 2**30  # address-space limit of the memory probes (bytes)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (s)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def randomize_adapters(model, seed: int = 0, b_std: float = 0.3, log_a: float = -3.0) -> None:
    """Non-zero B and a realistic noise ratio, so the adapters change the output and the draws differ."""
    from matbalora.adapters import adapters_of

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * b_std)
            if hasattr(m, "log_a"):
                m.log_a.fill_(log_a)


def balora_model(last_blocks: int | None = None, method: str = "balora"):
    from matbalora.config import AdapterConfig
    from matbalora.model import BandGapModel

    torch.manual_seed(0)
    kw = {} if last_blocks is None else {"last_blocks": last_blocks}
    model = BandGapModel.from_pretrained(method, adapter=AdapterConfig(bayesian=method == "balora", **kw))
    randomize_adapters(model)
    return model


# ----------------------------------------------------------------------------- 1. profile


def profile(args, model) -> tuple[dict, list, list]:
    """ms per structure of each stage; returns (profile, structures, graphs)."""
    from chgnet.model.model import BatchedGraph

    from matbalora.backbones.chgnet import FAMILY as CHGNET
    from matbalora.data.formats import file_entries
    from matbalora.data.graph_cache import GraphCache
    from matbalora.data.validation import DEFAULT_MAX_ATOMS, check_structure
    from matbalora.model import DEFAULT_MAX_ROWS, plan_passes
    from matbalora.predict import Predictor, _frame, prepare

    t0 = time.perf_counter()
    entries = list(file_entries(args.data, id_key="material_id", target_key="band_gap", limit=args.n + 50, max_atoms=DEFAULT_MAX_ATOMS))
    t_parse = (time.perf_counter() - t0) / len(entries)
    parsed = [e.structure for e in entries if e.structure is not None]
    t0 = time.perf_counter()
    ok = [s for s in parsed if check_structure(s) is None]
    t_valid = (time.perf_counter() - t0) / len(parsed)
    structures = ok[: args.n]
    t0 = time.perf_counter()
    graphs = [model.structure_to_graph(s, graph_id=str(i)) for i, s in enumerate(structures)]
    t_graph = (time.perf_counter() - t0) / len(structures)
    with tempfile.TemporaryDirectory() as tmp:
        cache = GraphCache(tmp, converter=model.backbone.graph_converter, backbone_version="0.3.0")
        cache.graphs(structures, progress=False)
        t0 = time.perf_counter()
        cache.graphs(structures, progress=False)
        t_hit = (time.perf_counter() - t0) / len(structures)

    model.sample_gaps(graphs[:8], samples=16)  # warm-up: first calls pay one-off allocations
    rows = [CHGNET.graph_rows(g) for g in graphs]
    out = {"n_structures": len(structures), "atoms_mean": float(np.mean([len(s) for s in structures])),
           "rows_mean": float(np.mean(rows)), "rows_max": int(max(rows))}
    stages = {"parse": t_parse, "validate": t_valid, "graph_convert": t_graph, "graph_cache_hit": t_hit}

    def collate(part: slice, draws: int) -> None:  # the batches sample_gaps builds for these crystals
        for p in plan_passes(rows[part], draws=draws, max_rows=DEFAULT_MAX_ROWS, max_crystals=64):
            BatchedGraph.from_graphs(graphs[part][p.start : p.stop], bond_basis_expansion=model.backbone.bond_basis_expansion,
                                     angle_basis_expansion=model.backbone.angle_basis_expansion)

    t = paired(len(graphs), args.chunk, {
        "collate_S0": lambda part: collate(part, 1),
        "all_S0": lambda part: model.sample_gaps(graphs[part], samples=0),
        "collate_S16": lambda part: collate(part, 16),
        "all_S16": lambda part: model.sample_gaps(graphs[part], samples=16, seed=0),
    }, args.repeats)
    for samples in (0, 16):
        stages[f"collate_S{samples}"] = t[f"collate_S{samples}"] / len(graphs)
        stages[f"forward_S{samples}"] = (t[f"all_S{samples}"] - t[f"collate_S{samples}"]) / len(graphs)
        out[f"passes_S{samples}"] = len(plan_passes(rows, draws=max(samples, 1), max_rows=DEFAULT_MAX_ROWS, max_crystals=64))
    prep = prepare(model, structures)
    draws = Predictor(model).sample(prep, samples=16)
    mean, std = draws.gaps.mean(0), draws.gaps.std(0, ddof=1)
    stages["dataframe"] = best_of(lambda: _frame(prep, mean, std, np.full(mean.shape, np.nan), 1.0, 0.9), args.repeats) / len(graphs)
    out["ms_per_structure"] = {k: round(1e3 * v, 3) for k, v in stages.items()}
    return out, structures, graphs


# ----------------------------------------------------------------------------- 2. ratios


def paired(n: int, chunk: int, variants: dict[str, Callable[[slice], object]], repeats: int) -> dict[str, float]:
    """Seconds of each variant over ``n`` crystals: on each chunk of crystals the variants run back to
    back (``repeats`` rounds, minimum kept), so a load change on a shared machine hits all of them alike."""
    total = dict.fromkeys(variants, 0.0)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeats):
            for key, fn in variants.items():
                best[key] = min(best[key], best_of(lambda: fn(part), 1))
        for key in total:
            total[key] += best[key]
    return total


def mc_ratio(args, model, structures, graphs, every_model) -> dict:
    """(a) 16 draws vs one deterministic pass, forward only and end to end."""
    from matbalora.predict import Predictor

    predictor = Predictor(model)
    b = paired(len(graphs), args.chunk, {
        "S0": lambda part: model.sample_gaps(graphs[part], samples=0),
        "S16": lambda part: model.sample_gaps(graphs[part], samples=16, seed=1),
        "S1": lambda part: model.sample_gaps(graphs[part], samples=1, seed=1),
        "e2e_S0": lambda part: predictor.predict(structures[part], samples=0),
        "e2e_S16": lambda part: predictor.predict(structures[part], samples=16),
        "every_block_S0": lambda part: every_model.sample_gaps(graphs[part], samples=0),
        "every_block_S16": lambda part: every_model.sample_gaps(graphs[part], samples=16, seed=1),
    }, args.repeats)
    t_e2e_s1 = b["e2e_S0"] - b["S0"] + b["S1"]  # the same prepare work, one drawn pass
    return {
        "seconds": {k: round(v, 3) for k, v in b.items()},
        "forward_S16_over_S0": b["S16"] / b["S0"],
        "forward_naive16_over_S0 (16 x the one-draw pass)": 16 * b["S1"] / b["S0"],
        "end_to_end_S16_over_S0": b["e2e_S16"] / b["e2e_S0"],
        "end_to_end_naive16_over_S0 (derived: 16 x (prepare + one drawn pass))": 16 * t_e2e_s1 / b["e2e_S0"],
        "every_block_forward_S16_over_S0": b["every_block_S16"] / b["every_block_S0"],
        "every_block_S0_over_default_S0": b["every_block_S0"] / b["S0"],
        "ms_per_structure": {k: round(1e3 * v / len(graphs), 3) for k, v in b.items()},
    }


def chgnet_ratio(args, model, graphs) -> dict:
    """(b) our deterministic pass vs CHGNet's own batched energy prediction on the same graphs."""
    from matbalora.backbones.chgnet import load_chgnet

    chgnet = load_chgnet()
    sizes = sorted({16, args.chunk})
    b = paired(len(graphs), args.chunk, {
        "ours": lambda part: model.sample_gaps(graphs[part], samples=0),
        **{f"chgnet_batch_size={bs}": lambda part, bs=bs: chgnet.predict_graph(graphs[part], task="e", batch_size=bs) for bs in sizes},
    }, args.repeats)
    n = len(graphs)
    best = min(v for k, v in b.items() if k != "ours")
    return {
        "ours_crystals_per_s": n / b["ours"],
        "chgnet_crystals_per_s": {k.removeprefix("chgnet_"): n / v for k, v in b.items() if k != "ours"},
        "throughput_ratio_vs_best_chgnet": best / b["ours"],
    }


def train_ratio(args, graphs) -> dict:
    """(c) one optimiser step (forward with one draw, ELBO, backward, AdamW) on 32 crystals: BaLoRA vs
    LoRA on cached frozen-prefix features (how ``fit`` trains the default placement) and on graphs;
    cached features vs graphs; adapters in every block vs the default."""
    from matbalora.backbones.chgnet import FAMILY as CHGNET

    models = {m: balora_model(method=m) for m in ("lora", "balora")}
    models["lora_every_block"] = balora_model(last_blocks=0, method="lora")
    batch = graphs[:TRAIN_BATCH]
    block = CHGNET.prefix_block(models["lora"].backbone, "lora")
    cached = CHGNET.compute_prefixes(models["lora"].backbone, batch, block, progress=False)
    y = torch.rand(len(batch))
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    variants = {"lora_cached": ("lora", cached), "balora_cached": ("balora", cached), "lora_graphs": ("lora", batch),
                "balora_graphs": ("balora", batch), "lora_every_block_graphs": ("lora_every_block", batch)}

    def step(key):
        name, inputs = variants[key]
        model, opt = models[name], opts[name]
        model.train()
        with model.context.sampling("sample" if model.is_bayesian else "mean", generator=gen):
            out = {k: v[0] for k, v in model(inputs, samples=1).items()}
            loss = model.head.loss(out, y) + model.kl() / 10_000
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {k: [] for k in variants}
    for key in variants:
        step(key)  # warm-up
    for i in range(max(6, 4 * args.repeats)):  # alternate the order, so no variant always runs first
        for key in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            times[key].append(best_of(lambda: step(key), 1))

    def ratio(num: str, den: str) -> float:
        return float(np.median([b / a for a, b in zip(times[den], times[num])]))

    return {
        "seconds_per_step_median": {k: float(np.median(v)) for k, v in times.items()},
        "balora_over_lora_cached_median_of_pairs": ratio("balora_cached", "lora_cached"),
        "balora_over_lora_graphs_median_of_pairs": ratio("balora_graphs", "lora_graphs"),
        "graphs_over_cached_lora_median_of_pairs": ratio("lora_graphs", "lora_cached"),
        "every_block_over_default_lora_graphs_median_of_pairs": ratio("lora_every_block_graphs", "lora_graphs"),
        "cached_block": block,
        "batch_crystals": len(batch),
        "trainable_parameters": {k: m.parameter_counts()["trainable"] for k, m in models.items()},
    }


def memory_probe(args) -> dict:
    """(d) peak RSS of fresh processes predicting the 1,000-atom supercell with 16 samples."""
    import psutil

    runs = {"row_budget": None, "all_draws_in_one_pass": 10**9}
    if args.no_unbounded_probe:
        del runs["all_draws_in_one_pass"]
    out = {}
    for name, max_rows in runs.items():
        if max_rows is not None and psutil.virtual_memory().available < MEMORY_CAP + 2**30:
            out[name] = {"skipped": f"less than {MEMORY_CAP / 2**30 + 1:.0f} GiB of free memory on this machine"}
            continue
        cmd = [sys.executable, __file__, "--memory-probe", "--data", str(args.data)]
        if max_rows is not None:
            cmd += ["--max-rows", str(max_rows)]
        if args.no_tune_allocator:
            cmd.append("--no-tune-allocator")
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                             preexec_fn=_cap_address_space)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            out[name] = {"failed": f"exit {res.returncode} under a {MEMORY_CAP / 2**30:.0f} GiB address-space cap: {last}"}
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _cap_address_space() -> None:  # a runaway probe fails alone instead of waking the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _memory_probe_child(args) -> None:
    from matbalora.backbones.chgnet import FAMILY as CHGNET
    from matbalora.data.readers import load_dataset
    from matbalora.model import DEFAULT_MAX_ROWS, plan_passes

    ds = load_dataset(args.data, max_structures=20)
    big = ds.structures[ds.ids.index(BIG_ID)] * BIG_SUPERCELL
    model = balora_model()
    graph = model.structure_to_graph(big)
    before = _peak_rss_mb()
    max_rows = args.max_rows or DEFAULT_MAX_ROWS
    t0 = time.perf_counter()
    gaps = model.sample_gaps([graph], samples=16, seed=0, max_rows=max_rows).gaps
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    print(json.dumps({
        "formula": big.composition.reduced_formula, "atoms": len(big), "rows_per_draw": CHGNET.graph_rows(graph),
        "max_rows": max_rows, "passes": len(plan_passes([CHGNET.graph_rows(graph)], draws=16, max_rows=max_rows, max_crystals=1)),
        "rss_before_predict_mb": round(before), "peak_rss_mb": round(peak), "seconds": round(seconds, 2),
        "gap_mean_eV": float(gaps.mean()), "gap_std_eV": float(gaps.std(0, ddof=1)[0]),
    }))


def _peak_rss_mb() -> float:
    """High-water RSS of this process (VmHWM; unlike ru_maxrss it does not carry the parent's peak over exec)."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def screen_rate(args, model, structures) -> dict:
    """(e) crystals per second through matbalora.screen (validation, graphs, draws, table)."""
    import matbalora
    from matbalora.predict import Predictor

    predictor = Predictor(model)
    rates = {}
    for samples in (16, 0):
        t = best_of(lambda: matbalora.screen(structures, model=predictor, samples=samples, progress=False), 1)
        rates[f"samples={samples}"] = len(structures) / t
    return {"crystals_per_s": rates, "cpu": "2-core shared CPU, torch threads=%d" % torch.get_num_threads()}


# ----------------------------------------------------------------------------- report


def table(result: dict) -> str:
    p, a, b, c, d, e = (result[k] for k in ("profile", "mc_samples", "vs_chgnet", "training_step", "memory_1000_atoms", "screening"))
    lines = [f"load average at start {result['loadavg_start']}, at end {result['loadavg_end']}; "
             f"{p['n_structures']} crystals, {p['atoms_mean']:.1f} atoms and {p['rows_mean']:.0f} rows on average", "",
             "profile (ms per structure)"]
    lines += [f"  {k:<18} {v:10.2f}" for k, v in p["ms_per_structure"].items()]
    budget = d.get("row_budget", {})
    one = d.get("all_draws_in_one_pass", {"skipped": "not run"})
    lines += ["", "ratio                                         measured   target",
              f"(a) 16 samples / deterministic, forward     {a['forward_S16_over_S0']:8.2f}x   <= 8x",
              f"    naive loop of 16 one-draw passes         {a['forward_naive16_over_S0 (16 x the one-draw pass)']:8.2f}x",
              f"    16 samples / deterministic, end to end  {a['end_to_end_S16_over_S0']:8.2f}x   <= 8x",
              f"    naive loop end to end (derived)          {a['end_to_end_naive16_over_S0 (derived: 16 x (prepare + one drawn pass))']:8.2f}x",
              f"    adapters in every block, forward         {a['every_block_forward_S16_over_S0']:8.2f}x",
              f"(b) deterministic / CHGNet energy throughput {b['throughput_ratio_vs_best_chgnet']:7.2f}x   >= 1x",
              f"(c) BaLoRA / LoRA training step (median)    {c['balora_over_lora_cached_median_of_pairs']:8.2f}x   <= 1.15x",
              f"    the same from graphs                     {c['balora_over_lora_graphs_median_of_pairs']:8.2f}x",
              f"    LoRA step from graphs / cached features  {c['graphs_over_cached_lora_median_of_pairs']:8.2f}x",
              f"    LoRA step, every block / default         {c['every_block_over_default_lora_graphs_median_of_pairs']:8.2f}x",
              f"(d) peak RSS, 1,000 atoms, 16 samples        {budget.get('peak_rss_mb', float('nan')):7.0f} MB  < 8192 MB",
              f"    all 16 draws in one pass (no row budget) {one.get('peak_rss_mb', one.get('skipped') or one.get('failed'))} MB",
              f"(e) screening, 16 samples                    {e['crystals_per_s']['samples=16']:7.2f} crystals/s"
              f"   (deterministic: {e['crystals_per_s']['samples=0']:.2f})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="real crystals to time")
    parser.add_argument("--repeats", type=int, default=2, help="timings per variant and chunk (the minimum is kept)")
    parser.add_argument("--chunk", type=int, default=40, help="crystals per chunk on which the variants alternate")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-tune-allocator", action="store_true", help="keep glibc's default mmap thresholds")
    parser.add_argument("--no-unbounded-probe", action="store_true", help="skip (d) with every draw in one pass (slow)")
    parser.add_argument("--only", choices=["epoch", "layer"], default=None,
                        help="run only this part and merge it into --out (epoch: benchmarks/speed_epoch.py; layer: its BaLoRA layer step alone)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tuned = False if args.no_tune_allocator else tune_cpu_allocator()
    if args.memory_probe:
        _memory_probe_child(args)
        return
    if args.only:
        from speed_epoch import epoch_ratio, grouped_layer_ratio, real_crystals

        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        graphs, targets = real_crystals(args.data, args.n)
        key, part = (("training_epoch", lambda: epoch_ratio(graphs, targets, rounds=args.repeats)) if args.only == "epoch" else
                     ("balora_layer_step", lambda: grouped_layer_ratio([int(g.atom_graph.shape[0]) for g in graphs[:32]])))
        result[key] = {"command": " ".join(["OMP_NUM_THREADS=%s" % os.environ.get("OMP_NUM_THREADS", "?"), "python", *sys.argv]),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()], **part()}
        write_json(args.out, result)
        print(json.dumps(result[key], indent=1))
        return
    result = {"command": " ".join(["OMP_NUM_THREADS=%s" % os.environ.get("OMP_NUM_THREADS", "?"), "python", *sys.argv]),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "allocator_tuned": tuned,
              "python": platform.python_version()}
    t_start = time.perf_counter()
    result["memory_1000_atoms"] = memory_probe(args)  # first: fresh processes while this one is small
    model = balora_model()
    result["profile"], structures, graphs = profile(args, model)
    every = balora_model(last_blocks=0)
    result["mc_samples"] = mc_ratio(args, model, structures, graphs, every)
    del every
    result["vs_chgnet"] = chgnet_ratio(args, model, graphs)
    result["training_step"] = train_ratio(args, graphs)
    result["screening"] = screen_rate(args, model, structures)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, result)
    print(table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
