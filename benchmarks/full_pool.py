"""Models trained on the whole Materials Project pool (issue 14), from the on-disk prefix store.

    python benchmarks/full_pool_data.py cache --worker 0 --workers 2 &   # once; resumable (both cores)
    python benchmarks/full_pool_data.py cache --worker 1 --workers 2
    python benchmarks/full_pool.py train NAME [NAME ...]   # resumable: a killed run continues from its checkpoint
    # runs on another store (STORES) need it first, e.g. for sevennet_lora_10k_seed0:
    python benchmarks/full_pool_data.py cache --backbone sevennet --n-train 10000 --worker 0 --workers 2 &  # and --worker 1
    python benchmarks/full_pool.py revar NAME [NAME ...]   # a finished run with separate variance MLPs (VARIANCE_REFITS)
    python benchmarks/full_pool.py rehead NAME [NAME ...]  # a finished run's adapters with a new gap head (REHEADS)
    python benchmarks/full_pool.py evaluate                # benchmarks/results/full_pool/results.json
    python benchmarks/full_pool.py forest                  # Magpie random forest at the learning-curve sizes
    python benchmarks/full_pool.py ship BALORA ENSEMBLE_PREFIX   # copy into models/

Protocol (``full_pool_data``): test = the 1,000 Matbench fold-0 crystals of every earlier benchmark;
validation = 1,000 crystals of the other folds; training = the rest (82,000+), nested prefixes of one
seeded permutation for the learning curve. Runs go to ``runs/full_pool/NAME``; every metric is reported
on all test crystals and on the non-metals apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool_data import full_pool, open_store, raw_frames  # noqa: E402
from mp_gap_data import REPO  # noqa: E402

from matbalora.atomic import write_json  # noqa: E402
from matbalora.backbones.prefix_store import StoreBatches  # noqa: E402
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig, to_dict  # noqa: E402
from matbalora.data.splits import Split  # noqa: E402
from matbalora.finetune import PreparedData, train_model  # noqa: E402

RUNS = REPO / "runs" / "full_pool"
RESULTS = REPO / "benchmarks" / "results" / "full_pool"
NLL_MEANMAX = HeadConfig(loss="nll", pooling="mean_max")
#: the full-pool recipe: L1 on the gap (the 10k NLL run trailed L1 by 0.13 eV validation MAE after one
#: epoch: 0.66 vs 0.53) plus a Gaussian NLL for the aleatoric variance around the detached gap
L1NLL_MEANMAX = HeadConfig(loss="l1_nll", pooling="mean_max")
BF16 = {"compute_dtype": "bfloat16"}
SIZES = {"2k": 2000, "10k": 10_000, "40k": 40_000, "full": None}
#: total epochs of the two-block BaLoRA warm restarts after the six-epoch one
BALORA_2BLOCK_EPOCHS = range(7, 13)

#: name -> (method, adapter, head, TrainConfig overrides, training crystals)
RECIPES: dict[str, tuple] = {
    # the recipe study at 10,000 crystals (one run each, chosen on validation)
    "lora_l1_mean_10k": ("lora", AdapterConfig(), HeadConfig(), {**BF16, "epochs": 8}, 10_000),
    "lora_nll_mean_10k": ("lora", AdapterConfig(), HeadConfig(loss="nll"), {**BF16, "epochs": 8}, 10_000),
    "lora_nll_meanmax_10k": ("lora", AdapterConfig(), NLL_MEANMAX, {**BF16, "epochs": 8}, 10_000),
    "lora_l1nll_meanmax_10k": ("lora", AdapterConfig(), L1NLL_MEANMAX, {**BF16, "epochs": 8}, 10_000),
    "lora_nll_meanmax_fp32_10k": ("lora", AdapterConfig(), NLL_MEANMAX, {"epochs": 8}, 10_000),
    # pooling over atoms: mean alone against mean+max (lora_curve_10k) on the chosen recipe
    "lora_l1nll_mean_10k": ("lora", AdapterConfig(), replace(L1NLL_MEANMAX, pooling="mean"), {**BF16, "epochs": 8, "head_refit_epochs": 300}, 10_000),
    # BaLoRA's prior weight on the chosen recipe (l1_nll + mean_max, head refit, KL warm-up); beta = 0.01
    # is balora_curve_10k
    **{f"balora_beta{b}_10k": ("balora", AdapterConfig(bayesian=True), L1NLL_MEANMAX,
                               {**BF16, "epochs": 8, "head_refit_epochs": 300, "beta": b, "kl_warmup_steps": 600}, 10_000) for b in (0, 0.1, 1)},
    # the learning curve of the full-pool recipe (l1_nll + mean_max, head refit): about the same number of
    # crystal passes (~80,000) at 10k, 40k and full (one epoch), 40,000 at 2k; early stopping on validation
    **{f"{m}_curve_{size}": (m, AdapterConfig(bayesian=m == "balora"), L1NLL_MEANMAX,
                             {**BF16, "epochs": ep, "head_refit_epochs": 300, **({"beta": 0.01, "kl_warmup_steps": kl} if m == "balora" else {})}, SIZES[size])
       for m in ("lora", "balora") for size, ep, kl in (("2k", 20, 600), ("10k", 8, 600), ("40k", 2, 2000))},
    # adapters in the last two CHGNet blocks (a store entering block 2) against the last block alone
    # (lora_curve_10k, balora_curve_10k), same recipe
    "lora_2blocks_10k": ("lora", AdapterConfig(last_blocks=2), L1NLL_MEANMAX, {**BF16, "epochs": 8, "head_refit_epochs": 300}, 10_000),
    "balora_2blocks_10k": ("balora", AdapterConfig(bayesian=True, last_blocks=2), L1NLL_MEANMAX,
                           {**BF16, "epochs": 8, "head_refit_epochs": 300, "beta": 0.01, "kl_warmup_steps": 600}, 10_000),
    # SevenNet-0 (adapters in its last interaction block, the family's default targets; float32: its
    # e3nn blocks have no bf16 path) against CHGNet at 10,000, same recipe
    # (five LoRA seeds: the SevenNet ensemble; seed 0 is the recipe-study run)
    **{f"sevennet_lora_10k_seed{s}": ("lora", None, L1NLL_MEANMAX, {"epochs": 8, "head_refit_epochs": 300, "seed": s}, 10_000) for s in range(5)},
    "sevennet_balora_10k": ("balora", None, L1NLL_MEANMAX, {"epochs": 8, "head_refit_epochs": 300, "beta": 0.01, "kl_warmup_steps": 600}, 10_000),
    # the full pool
    "balora_full": ("balora", AdapterConfig(bayesian=True), L1NLL_MEANMAX, {**BF16, "epochs": 1, "beta": 0.01, "kl_warmup_steps": 2000, "head_refit_epochs": 300}, None),
    **{f"lora_full_seed{s}": ("lora", AdapterConfig(), L1NLL_MEANMAX, {**BF16, "epochs": 1, "seed": s, "head_refit_epochs": 300}, None) for s in range(5)},
    # warm restarts (WARM_STARTS): two more epochs from the one-epoch models, the KL already at full weight
    "balora_full_3ep": ("balora", None, None, {**BF16, "epochs": 2, "beta": 0.01, "kl_warmup_steps": 0, "head_refit_epochs": 300}, None),
    **{f"lora_full_3ep_seed{s}": ("lora", None, None, {**BF16, "epochs": 2, "seed": s, "head_refit_epochs": 300}, None) for s in range(5)},
    # a second warm restart: two more epochs from the three-epoch BaLoRA (five in all)
    "balora_full_5ep": ("balora", None, None, {**BF16, "epochs": 2, "beta": 0.01, "kl_warmup_steps": 0, "head_refit_epochs": 300}, None),
    # adapters widened into the last two blocks (the recipe study's largest gain at 10k), warm-started
    # from the full-pool models above: the block-2 adapters start at B = 0, so training starts from them
    "balora_full_2blocks_6ep": ("balora", AdapterConfig(bayesian=True, last_blocks=2), None,
                                {**BF16, "epochs": 1, "beta": 0.01, "kl_warmup_steps": 0, "head_refit_epochs": 300}, None),
    **{f"lora_full_2blocks_4ep_seed{s}": ("lora", AdapterConfig(last_blocks=2), None, {**BF16, "epochs": 1, "seed": s, "head_refit_epochs": 300}, None)
       for s in range(5)},
    # one more two-block epoch at a time from the six-epoch two-block BaLoRA (7 epochs: the last two in two
    # blocks, 8: the last three, ...), each a warm restart of the one before; from the ninth on in float32:
    # they ran on an AVX2 machine without native bf16, where bf16 steps are emulated (9.9 s per step of 32
    # against 0.55 s on the machine with bf16 units that trained epochs 7-8)
    **{f"balora_full_2blocks_{n}ep": ("balora", None, None, {**(BF16 if n <= 8 else {}), "epochs": 1, "beta": 0.01, "kl_warmup_steps": 0,
                                                             "head_refit_epochs": 300}, None)
       for n in BALORA_2BLOCK_EPOCHS},
    # the ensemble members' fifth epoch (the second in two blocks), float32 as above
    **{f"lora_full_2blocks_5ep_seed{s}": ("lora", None, None, {"epochs": 1, "seed": s, "head_refit_epochs": 300}, None) for s in range(5)},
}
#: run -> the prefix store it trains from (``full_pool_data.open_store`` keywords; default: CHGNet, last block)
STORES = {"lora_2blocks_10k": {"block": 2}, "balora_2blocks_10k": {"block": 2}, "sevennet_balora_10k": {"backbone": "sevennet"},
          **{f"sevennet_lora_10k_seed{s}": {"backbone": "sevennet"} for s in range(5)},
          "balora_full_2blocks_6ep": {"block": 2}, **{f"balora_full_2blocks_{n}ep": {"block": 2} for n in BALORA_2BLOCK_EPOCHS},
          **{f"lora_full_2blocks_{n}ep_seed{s}": {"block": 2} for n in (4, 5) for s in range(5)}}
#: run -> the finished run it warm-starts from (its weights, adapters and head; a fresh cosine schedule)
WARM_STARTS = {"balora_full_3ep": "balora_full", "balora_full_5ep": "balora_full_3ep", **{f"lora_full_3ep_seed{s}": f"lora_full_seed{s}" for s in range(5)},
               "balora_full_2blocks_6ep": "balora_full_5ep", **{f"balora_full_2blocks_{n}ep": f"balora_full_2blocks_{n - 1}ep" for n in BALORA_2BLOCK_EPOCHS},
               # not from the ``_var5`` models: warm-started from balora_full_2blocks_9ep_var5, the tenth epoch's
               # loss jumped from ~0 to ~2.4 within 30 steps and stayed there (the sharp variance MLPs
               # diverged in the warm-up, and their gradient reaches the adapters); ``revar`` after each epoch
               **{f"lora_full_2blocks_4ep_seed{s}": f"lora_full_3ep_seed{s}" for s in range(5)},
               **{f"lora_full_2blocks_5ep_seed{s}": f"lora_full_2blocks_4ep_seed{s}" for s in range(5)}}
#: run -> the finished run whose head variance it replaces by five separate MLPs (``revar``:
#: ``matbalora.finetune.refit_variance_of``, 100 epochs each on the head refit's 20,000 training crystals,
#: or on the number of crystals that VARIANCE_REFIT_CRYSTALS gives; a name ending in ``_40k`` or ``_full``)
VARIANCE_REFITS = {**{f"balora_full_2blocks_{n}ep_var5": f"balora_full_2blocks_{n}ep" for n in BALORA_2BLOCK_EPOCHS if n >= 8},
                   **{f"balora_full_2blocks_{n}ep_var5_{size}": f"balora_full_2blocks_{n}ep" for n in BALORA_2BLOCK_EPOCHS if n >= 9
                      for size in ("40k", "full")},
                   **{f"lora_full_2blocks_4ep_var5_seed{s}": f"lora_full_2blocks_4ep_seed{s}" for s in range(5)}}
#: variance refit -> training crystals for its MLPs (None: all of the pool's); the others take
#: refit_variance_of's default (20,000, the head refit's crystals): going from 8,192 to 20,000 raised the
#: eight-epoch model's test non-metal Spearman from 0.318 to 0.375, the largest gain of the variance study
VARIANCE_REFIT_CRYSTALS = {name: SIZES[name.rsplit("_", 1)[1]] for name in VARIANCE_REFITS if name.endswith(("_40k", "_full"))}
STORES |= {name: STORES[source] for name, source in VARIANCE_REFITS.items()}
#: run -> (finished run whose adapters it keeps, its new gap head) for ``rehead``
#: (``matbalora.finetune.rehead_of``): the gap head trained afresh by L1 on the frozen pooled features of
#: all training crystals, then five separate 64 x 2 variance MLPs on its residuals. A 512 x 3 head on the
#: ten-epoch model's features of 7,300 training crystals reached validation MAE 0.250 where the 64 x 2
#: head trained with the adapters had 0.261
WIDE_HEADS = {w: HeadConfig(hidden=w, layers=3, loss="l1", pooling="mean_max", standardize=True) for w in (256, 512)}
REHEADS = {**{f"balora_full_2blocks_10ep_head{w}x3_var5_full": ("balora_full_2blocks_10ep", head, {}) for w, head in WIDE_HEADS.items()},
           # variance MLPs on out-of-fold residuals (four folds): benchmarks/oof_variance_probe.py measured
           # test non-metal Spearman 0.352 -> 0.401 with posterior-mean features
           "balora_full_2blocks_10ep_head512x3_oofvar5_full": ("balora_full_2blocks_10ep", WIDE_HEADS[512], {"variance_folds": 4}),
           # and the gap head also fitted on two adapter draws of 16,000 training crystals: predictions average
           # the head over draws, and the head fitted on posterior-mean features alone answered MgO's draws
           # erratically (16-draw gap 2.37 eV against 4.41 at the posterior mean; test MAE 0.182 vs 0.170)
           "balora_full_2blocks_10ep_head512x3_drawn16kx2_oofvar5_full": ("balora_full_2blocks_10ep", WIDE_HEADS[512],
                                                                         {"variance_folds": 4, "draw_crystals": 16_000, "draws": 2}),
           # the same head with a censored output (max(z, 0), trained on z where the gap is positive): under
           # softplus the shipped head left all five diamond-like training carbons at z ~ -16, gradient ~1e-7
           "balora_full_2blocks_10ep_head512x3cens_var5_full": ("balora_full_2blocks_10ep", replace(WIDE_HEADS[512], output="censored"), {}),
           # and fitted on two adapter draws of 16,000 crystals as well: MgO's 16 draws still range 0.25-4.92 eV
           "balora_full_2blocks_10ep_head512x3cens_drawn16kx2_var5_full": ("balora_full_2blocks_10ep", replace(WIDE_HEADS[512], output="censored"),
                                                                          {"draw_crystals": 16_000, "draws": 2}),
           # and five gap heads from different seeds on the same rows (their spread an epistemic part beside
           # the adapter draws), with variance MLPs on in-sample or out-of-fold residuals of their mean
           # (benchmarks/uncertainty_probe.py measured the variants on the cached features first)
           **{f"balora_full_2blocks_10ep_head512x3cens_drawn16kx2_heads5_{var}5_full": (
               "balora_full_2blocks_10ep", replace(WIDE_HEADS[512], output="censored"),
               {"draw_crystals": 16_000, "draws": 2, "gap_members": 5} | ({"variance_folds": 4} if var == "oofvar" else {}))
              for var in ("var", "oofvar")},
           # and the five heads bagged (each on its own resample of the rows) for members that differ in their data
           "balora_full_2blocks_10ep_head512x3cens_drawn16kx2_heads5boot_var5_full": (
               "balora_full_2blocks_10ep", replace(WIDE_HEADS[512], output="censored"),
               {"draw_crystals": 16_000, "draws": 2, "gap_members": 5, "bootstrap": True}),
           # the ensemble's members with BaLoRA's censored 512 x 3 head (an ensemble ``lora_full_2blocks_4ep_head512x3cens_var5``:
           # five members, one head each, against BaLoRA's five heads; the drawn rows are BaLoRA's alone)
           **{f"lora_full_2blocks_4ep_head512x3cens_var5_seed{s}": (f"lora_full_2blocks_4ep_var5_seed{s}", replace(WIDE_HEADS[512], output="censored"), {})
              for s in range(5)}}
STORES |= {name: STORES[source] for name, (source, _head, _kw) in REHEADS.items()}

_FORMULA = re.compile(r"formula=(\S+)")


def eval_data(store) -> PreparedData:
    """Validation and test crystals of the pool as in-memory prefixes (fp32), in that order."""
    pool = full_pool()
    frames, ids, _ = raw_frames()
    formula = {sid: _FORMULA.search(f.comment).group(1) for sid, f in zip(ids, frames)}
    unbuilt = {store.locate_position(i) for i in pool.val + pool.test} - set(store.shards)
    if unbuilt:
        raise SystemExit(f"{store.root}: shards {sorted(unbuilt)} (validation / test) are not built yet; run full_pool_data.py cache")
    val = [i for i in pool.val if i in store.kept]
    test = [i for i in pool.test if i in store.kept]
    keep = val + test
    graphs = store.prefix_graphs(keep)
    split = Split(np.zeros(0, np.int64), np.arange(len(val)), np.arange(len(val), len(keep)), kind="full pool: val + Matbench fold-0 test", seed=0)
    from pymatgen.core import Composition

    return PreparedData(
        ids=keep, formulas=[Composition(formula[i]).reduced_formula for i in keep], n_atoms=store.n_atoms(keep),
        targets=store.targets(keep), graphs=graphs, split=split,
        provenance={"source": "shared/data/mp_gap/mp_gap.extxyz.gz", "protocol": "benchmarks/full_pool_data.py", "store": str(store.root),
                    "rejected_in_store": len(store.rejected())},
    )


def train(name: str, threads: int = 1) -> Path:
    method, adapter, head, overrides, n_train = RECIPES[name]
    torch.set_num_threads(threads)
    pool = full_pool()
    # a subset run may start while the full-pool build is still running: it needs only its own shards
    where = STORES.get(name, {})
    store = open_store(allow_missing=n_train is not None, **where)
    wanted = pool.val + pool.test + pool.train_subset(n_train)
    missing = {store.locate_position(i) for i in wanted} - set(store.shards)
    if missing:
        flags = [f"--{k} {v}" for k, v in where.items()] + ([f"--n-train {n_train}"] if n_train is not None else [])
        raise SystemExit(f"{name}: shards {sorted(missing)[:8]} of the prefix store are not built yet; run "
                         f"full_pool_data.py cache {' '.join(flags)}".rstrip())
    train_ids = [i for i in pool.train_subset(n_train) if i in store.kept]
    cfg = replace(TrainConfig(method=method), **overrides)
    out = RUNS / name
    if (out / "config.json").is_file():
        print(f"{name}: finished already ({out})")
        return out
    init = finished_run(WARM_STARTS[name]) if name in WARM_STARTS else None
    if name in WARM_STARTS and init is None:
        raise SystemExit(f"{name}: warm-starts from {RUNS / WARM_STARTS[name]}, which is not finished; train {WARM_STARTS[name]} first")
    t0 = time.perf_counter()
    train_model(None, out, train=cfg, adapter=adapter, head=head, data=eval_data(store), train_batches=StoreBatches(store, train_ids), backbone=where.get("backbone", "chgnet"),
                resume=(out / "checkpoint").is_dir(), samples=16, progress=True, init_from=init)
    print(f"{name}: {len(train_ids)} crystals, {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _shipped_rehead_of(source_name: str) -> Path | None:
    """A shipped model that is a rehead of run ``source_name`` (``training.rehead.source``): it holds
    that run's adapters, and a new rehead replaces its head anyway (runs/ is not in git; a fresh
    machine has only the shipped copies)."""
    for config in sorted((REPO / "models").glob("**/config.json")):
        card = json.loads(config.read_text())
        # its command names the rehead run (whose source is in REHEADS), or its card the source folder
        runs = [REHEADS[w][0] for w in _words_after(card.get("command", ""), "rehead") if w in REHEADS]
        if source_name in runs or Path(card.get("training", {}).get("rehead", {}).get("source", "")).name == source_name:
            return config.parent
    return None


def finished_run(name: str) -> Path | None:
    """The folder of finished run ``name``: ``runs/full_pool/NAME``, or else its shipped copy in
    ``models/`` (a card whose command trained it, with the recipe's training config: one command may
    train several runs; runs/ is not in git, so a fresh machine has only the shipped copies)."""
    if (RUNS / name / "config.json").is_file():
        return RUNS / name
    seed = re.search(r"_seed(\d+)$", name)
    verb = producing_verb(name)
    if verb != "train":  # its shipped copy: a card written by ``revar NAME`` / ``rehead NAME``
        # one command refits several members (``revar ..._seed0 ... _seed4``): a member's card is the one of its seed
        return next((c.parent for c in sorted((REPO / "models").glob("**/config.json"))
                     for card in [json.loads(c.read_text())]
                     if name in _words_after(card.get("command", ""), verb)
                     and (seed is None or (card.get("training", {}).get("config") or {}).get("seed") == int(seed.group(1)))), None)
    method, _adapter, _head, overrides, _n = RECIPES[name]
    wanted = to_dict(replace(TrainConfig(method=method), **overrides))
    for config in sorted((REPO / "models").glob("**/config.json")):
        card = json.loads(config.read_text())
        training = card.get("training", {})
        # one command may train warm restarts of one config (7ep then 8ep): the epochs behind it tell them apart
        if (name in _words_after(card.get("command", ""), "train") and training.get("config") == wanted and "variance_refit" not in training
                and training.get("total_epochs", training.get("epochs_run")) == total_epochs(name)):
            return config.parent
    return None


def shared_store(runs: list[str], ensemble: bool = False, *, script: str) -> dict:
    """The store (``open_store`` keywords) that runs ``runs`` and, with ``ensemble``, the shipped ensemble's
    members (by the run names its card records) were all trained on; exits naming ``script`` when they differ."""
    stores = [STORES.get(r, {}) for r in runs]
    if ensemble:
        card = json.loads((REPO / "models" / "lora_ensemble" / "ensemble.json").read_text())
        stores.append(STORES.get(card["runs"][0], {}))
    if len({json.dumps(w, sort_keys=True) for w in stores}) != 1:
        raise SystemExit(f"{script}: the models were trained on different stores; compare models of one store")
    return stores[0]


def producing_verb(name: str) -> str:
    """The full_pool.py command that makes run ``name``: ``rehead``, ``revar`` or ``train``."""
    return "rehead" if name in REHEADS else "revar" if name in VARIANCE_REFITS else "train"


def _words_after(command: str, verb: str) -> list[str]:
    """The words after ``verb`` in a card's command (``... full_pool.py train A B`` -> [A, B])."""
    words = str(command).split()
    return words[words.index(verb) + 1 :] if verb in words else []


def total_epochs(name: str) -> int:
    """Epochs behind run ``name``: its own and those of the chain of runs it warm-starts from."""
    if name in VARIANCE_REFITS:
        return total_epochs(VARIANCE_REFITS[name])
    if name in REHEADS:
        return total_epochs(REHEADS[name][0])
    return RECIPES[name][3].get("epochs", TrainConfig().epochs) + (total_epochs(WARM_STARTS[name]) if name in WARM_STARTS else 0)


def revar(name: str, threads: int = 1) -> Path:
    """Run ``name`` of VARIANCE_REFITS: its source run with five separate variance MLPs (a finished one
    is kept; a killed one resumes its pass over the training crystals from ``runs/full_pool/.pooled_<sha256>_<crystals>.pt``, kept for the other refits of the same source)."""
    from matbalora.finetune import HEAD_REFIT_CRYSTALS, refit_variance_of

    torch.set_num_threads(threads)
    out = RUNS / name
    if (out / "config.json").is_file():
        print(f"{name}: finished already ({out})")
        return out
    source = finished_run(VARIANCE_REFITS[name])
    if source is None:
        raise SystemExit(f"{name}: needs the finished run {VARIANCE_REFITS[name]}; train it first")
    store = open_store(allow_missing=True, **STORES[name])
    train_ids = [i for i in full_pool().train if i in store.kept]
    t0 = time.perf_counter()
    crystals = VARIANCE_REFIT_CRYSTALS.get(name, HEAD_REFIT_CRYSTALS) or len(train_ids)
    refit_variance_of(source, out, data=eval_data(store), train_batches=StoreBatches(store, train_ids), crystals=crystals)  # 5 members x 100 epochs
    print(f"{name}: {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def rehead(name: str, threads: int = 1) -> Path:
    """Run ``name`` of REHEADS: its source's adapters with a new gap head and five separate variance
    MLPs, all fitted on the frozen pooled features of every training crystal (a finished one is kept; a
    killed one resumes its pass over the pool from ``runs/full_pool/.pooled_<sha256>_<crystals>.pt``, kept for the other refits of the same source)."""
    from matbalora.finetune import rehead_of

    torch.set_num_threads(threads)
    out = RUNS / name
    if (out / "config.json").is_file():
        print(f"{name}: finished already ({out})")
        return out
    source_name, head, options = REHEADS[name]
    source = finished_run(source_name) or _shipped_rehead_of(source_name)
    if source is None:
        raise SystemExit(f"{name}: needs the finished run {source_name}; train it first")
    store = open_store(allow_missing=True, **STORES[name])
    train_ids = [i for i in full_pool().train if i in store.kept]
    t0 = time.perf_counter()
    # crystals=len(train_ids), not None: the same resume key as ``revar ..._var5_full`` of the same source
    rehead_of(source, out, data=eval_data(store), train_batches=StoreBatches(store, train_ids), head=head, crystals=len(train_ids), **options)
    print(f"{name}: {time.perf_counter() - t0:.0f} s -> {out}")
    return out


KEYS = ("mae", "rmse", "spearman", "nll", "coverage_90", "mean_interval_width_90", "auc_sparsification_error")


def _split_scores(metrics: dict) -> dict:
    """``{"all": {...}, "nonmetal": {...}}`` from a flat metrics dict (``nonmetal_`` keys)."""
    return {"all": {k: metrics.get(k) for k in KEYS}, "nonmetal": {k: metrics.get(f"nonmetal_{k}") for k in KEYS}}


def _scores(frame, y: np.ndarray) -> dict:
    from matbalora.metrics import evaluate

    return _split_scores(evaluate(frame["band_gap"].to_numpy(), frame["std"].to_numpy(), y))


def evaluate() -> dict:
    """Test metrics (all / non-metals) of every finished run, from its model card (recalibrated on
    validation at the end of training), and of the ensembles of the runs ``*_seedK`` (recalibrated
    together on validation here)."""
    from matbalora.finetune import calibrate_and_score
    from matbalora.predict import EnsemblePredictor, Predictor

    results = {"protocol": __doc__.split("Protocol")[1].strip(), "runs": {}}
    earlier = json.loads((RESULTS / "results.json").read_text()).get("runs", {}) if (RESULTS / "results.json").is_file() else {}
    for name in (*RECIPES, *VARIANCE_REFITS, *REHEADS):
        folder = RUNS / name
        if not (folder / "config.json").is_file():
            if name in earlier:  # trained on another machine (runs/ is not in git): keep its committed scores
                results["runs"][name] = earlier[name]
            continue
        card = json.loads((folder / "config.json").read_text())
        tr = card["training"]
        results["runs"][name] = {"n_train": card["data"]["n_train"], "epochs": tr.get("total_epochs", tr["epochs_run"]),
                                 "warm_start": (tr.get("init_from") or {}).get("folder"), "best_val_mae": tr["best_val_mae"],
                                 "val_mae_by_epoch": [h["val_mae"] for h in tr["history"]], "train_seconds": tr["train_seconds"],
                                 "ms_per_crystal_epoch": 1e3 * float(np.mean([h["seconds_per_structure"] for h in tr["history"]])),
                                 "std_scale": card["calibration"].get("std_scale"), "std_floor": card["calibration"].get("std_floor"),
                                 "refit_val_mae": ((tr.get("rehead") or {}).get("head_refit") or tr.get("head_refit") or {}).get("val_mae_after"), "test_classes": card["metrics"].get("test_classes"),
                                 **_split_scores(card["metrics"]["test"]), "uncalibrated": _split_scores(card["metrics"].get("test_uncalibrated", {}))}
        if card["method"] == "balora":  # where the learned noise ended up (the beta sweep)
            from mp_gap_evaluate import noise_summary

            results["runs"][name]["noise"] = noise_summary(Predictor.load(folder).model)
        print(name, json.dumps(results["runs"][name]["all"]), json.dumps(results["runs"][name]["nonmetal"]), flush=True)
    prefixes = sorted({re.sub(r"_seed\d+$", "", n) for n in (*RECIPES, *VARIANCE_REFITS, *REHEADS) if re.search(r"_seed\d+$", n)})
    data: dict[str, PreparedData] = {}
    for prefix in prefixes:
        members = sorted(p for p in RUNS.glob(f"{prefix}_seed*") if (p / "config.json").is_file())
        # ensembles of more members than are here were scored on another machine: keep them
        results["runs"].update({k: v for k, v in earlier.items() if re.fullmatch(rf"{re.escape(prefix)}_ensemble(\d+)", k)
                                and int(k.rsplit("ensemble", 1)[1]) > len(members)})
        if len(members) < 2:
            continue
        name = f"{prefix}_ensemble{len(members)}"
        stamp = [f"{p.name}:{(p / 'model.safetensors').stat().st_mtime_ns}" for p in members]
        if earlier.get(name, {}).get("member_files") == stamp:  # the same member files: keep its scores
            results["runs"][name] = earlier[name]
            continue
        where = STORES.get(members[0].name, {})
        key = json.dumps(where, sort_keys=True)
        data[key] = data.get(key) or eval_data(open_store(allow_missing=True, **where))
        ens = EnsemblePredictor([Predictor.load(p) for p in members])
        calibration, metrics = calibrate_and_score(ens, data[key], samples=0)
        results["runs"][name] = {"members": len(members), "member_files": stamp, "std_scale": calibration.get("std_scale"), "std_floor": calibration.get("std_floor"),
                                 "test_classes": metrics.get("test_classes"), **_split_scores(metrics["test"]),
                                 "val": _split_scores(metrics["val"])}  # what the shipping rule reads (MAE, then NLL)
        print(name, json.dumps(results["runs"][name]["all"]), json.dumps(results["runs"][name]["nonmetal"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "results.json", results)
    return results


def pool_labels() -> tuple[dict[str, float], dict[str, str]]:
    """PBE gap (eV) and formula of every crystal of the pool, by Materials Project id."""
    frames, ids, _ = raw_frames()
    comment = {sid: f.comment for sid, f in zip(ids, frames)}
    sids = full_pool().ids
    return ({s: float(re.search(r"band_gap=(\S+)", comment[s]).group(1)) for s in sids},
            {s: _FORMULA.search(comment[s]).group(1) for s in sids})


def magpie_forest(X: np.ndarray, y) -> object:
    """The baseline forest: 100 trees on Magpie features, min_samples_leaf=2, one core."""
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=100, n_jobs=1, random_state=0, min_samples_leaf=2).fit(X, y)


def forest_predict(rf, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (std over the trees) of a forest's predictions."""
    trees = np.stack([t.predict(X) for t in rf.estimators_])
    return trees.mean(0), np.maximum(trees.std(0, ddof=1), 1e-6)


def forest(sizes: list[str]) -> dict:
    """Magpie composition features + a 100-tree random forest (std = spread of the trees) trained on
    the learning-curve subsets, recalibrated on validation, scored on the test crystals (the baseline
    a materials scientist picks first; matminer + scikit-learn)."""
    from mp_gap_data import MagpieFeatures

    from matbalora.calibration import StdScaler, fit_recalibration
    from matbalora.predict import raw_total_std

    pool = full_pool()
    gap, formula = pool_labels()
    magpie = MagpieFeatures()

    def features(sids):
        return magpie([formula[s] for s in sids])

    X_val, y_val = features(pool.val), np.array([gap[s] for s in pool.val])
    X_te, y_te = features(pool.test), np.array([gap[s] for s in pool.test])
    path = RESULTS / "forest.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    for size in sizes:
        sids = pool.train_subset(SIZES[size])
        t0 = time.perf_counter()
        rf = magpie_forest(features(sids), [gap[s] for s in sids])
        seconds = time.perf_counter() - t0
        vm, vs = forest_predict(rf, X_val)
        scaler = StdScaler.from_calibration(fit_recalibration(vm, vs, y_val))
        mean, raw = forest_predict(rf, X_te)
        import pandas as pd

        frame = pd.DataFrame({"band_gap": mean, "std": scaler.transform(raw_total_std(raw, np.full_like(raw, np.nan)))})
        out[size] = {"n_train": len(sids), "train_seconds": seconds, "model": "matminer Magpie + RandomForest(100 trees, min_samples_leaf=2)", **_scores(frame, y_te)}
        print("forest", size, json.dumps(out[size]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(path, out)
    return out


def ship(balora: str, ensemble_prefix: str | None) -> None:
    """Copy run ``balora`` (from runs/, or the copy already in models/) to models/balora and the runs
    ``{ensemble_prefix}_seedK`` to models/lora_ensemble (members recalibrated together on validation,
    ensemble.json written); without ``ensemble_prefix`` the shipped ensemble stays as it is."""
    from matbalora.finetune import calibrate_and_score
    from matbalora.predict import ENSEMBLE_FILE, EnsemblePredictor, Predictor

    models = REPO / "models"
    source = finished_run(balora)  # runs/full_pool/NAME, or its shipped copy (re-shipping it with a new ensemble)
    if source is None:
        raise SystemExit(f"ship needs a finished {balora} in {RUNS} (or its shipped copy in models/)")
    where = STORES.get(balora, {})
    data = eval_data(open_store(allow_missing=True, **where))
    staging = models / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    files = ("config.json", "model.safetensors", "split.json")
    (staging / "balora").mkdir(parents=True)
    for f in files:
        shutil.copy2(source / f, staging / "balora" / f)
    if ensemble_prefix is None:  # the ensemble's own test prefixes are loaded before anything is swapped in
        ens_card = json.loads((models / "lora_ensemble" / ENSEMBLE_FILE).read_text())
        ens_where = STORES.get(ens_card["runs"][0], {})
        ens_data = data if ens_where == where else eval_data(open_store(allow_missing=True, **ens_where))
        _swap_in(models, staging, ("balora",))
        shipped_plots(data, ens_card["metrics"], ensemble_data=ens_data)
        print(f"shipped {balora} into {models}; the ensemble stays ({', '.join(ens_card['runs'])})")
        return
    members = sorted(p for p in RUNS.glob(f"{ensemble_prefix}_seed*") if (p / "config.json").is_file())
    if len(members) < 2:
        raise SystemExit(f"ship needs >= 2 finished {ensemble_prefix}_seedK runs in {RUNS}")
    if any(STORES.get(m.name, {}) != where for m in members):
        raise SystemExit(f"ship: {balora} and the {ensemble_prefix} members were trained on different stores (backbones or blocks)")
    ens = EnsemblePredictor([Predictor.load(p) for p in members])
    calibration, metrics = calibrate_and_score(ens, data, samples=0)
    names = [f"member_{k}" for k in range(len(members))]
    for name, src in zip(names, members):
        (staging / "lora_ensemble" / name).mkdir(parents=True)
        for f in files:
            shutil.copy2(src / f, staging / "lora_ensemble" / name / f)
    card = json.loads((members[0] / "config.json").read_text())
    write_json(staging / "lora_ensemble" / ENSEMBLE_FILE, {
        "members": names, "seeds": [json.loads((m / "config.json").read_text())["training"]["config"]["seed"] for m in members],
        "method": "lora", "runs": [m.name for m in members], "calibration": calibration, "metrics": metrics, "data": card["data"],
        "command": f"python benchmarks/full_pool.py {producing_verb(members[0].name)} {' '.join(m.name for m in members)} && python benchmarks/full_pool.py ship {balora} {ensemble_prefix}"})
    _swap_in(models, staging, ("balora", "lora_ensemble"))
    shipped_plots(data, metrics)
    print(f"shipped {balora} and {len(members)} members of {ensemble_prefix} into {models}")


def _swap_in(models: Path, staging: Path, names: tuple[str, ...]) -> None:
    """Replace whole folders ``models/NAME`` by ``staging/NAME``, then drop the staging folder."""
    for name in names:
        old = models / f".old_{name}"
        shutil.rmtree(old, ignore_errors=True)
        if (models / name).exists():
            (models / name).rename(old)
        (staging / name).rename(models / name)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def shipped_plots(data: PreparedData, ensemble_metrics: dict, ensemble_data: PreparedData | None = None) -> None:
    """Calibration, parity and sparsification plots of the shipped models on the test crystals, and
    ``results/full_pool/shipped.json`` whose ``methods`` rows are the cards' test metrics (the app's
    model card page shows plots only next to the card whose numbers they come from); ``ensemble_data``:
    the ensemble's own prefixes where it was trained on another store than BaLoRA."""
    from matbalora.evaluation import plot_all
    from matbalora.metrics import bootstrap_intervals
    from matbalora.predict import EnsemblePredictor, Predictor

    models = REPO / "models"
    test, y = data.part("test"), data.targets[data.split.test]
    balora = Predictor.load(models / "balora")
    rows = {"balora": balora.card["metrics"]["test"], "lora_ensemble": ensemble_metrics["test"]}
    ens_data = ensemble_data or data
    ens_test = ens_data.part("test")
    if not np.array_equal(ens_data.targets[ens_data.split.test], y):
        raise SystemExit("shipped_plots: the two stores do not hold the same test crystals")
    frames = {"balora": balora.predict_prepared(test, samples=16, seed=0), "lora_ensemble": EnsemblePredictor.load(models / "lora_ensemble").predict_prepared(ens_test)}
    plots = []
    for name, frame in frames.items():
        plots += [p.name for p in plot_all(frame, y, RESULTS / "plots", name)]
    # how sure the cards' test numbers are: 95 % bootstrap intervals over these crystals (the app shows them)
    table = bootstrap_intervals(frames, y)
    intervals = {name: {r.metric: {"value": r.value, "low": r.low, "high": r.high} for r in table[table["model"] == name].itertuples()}
                 for name in frames}
    write_json(RESULTS / "shipped.json", {"methods": rows, "plots": plots, "intervals": intervals, "n_test": len(y),
                                          "command": "python benchmarks/full_pool.py ship ... (models/balora, models/lora_ensemble on the full-pool test crystals)"})


def claims(name: str = "balora_full", lora: str = "lora_full_seed0", sweep: tuple[int, ...] = (2, 4, 8, 16)) -> dict:
    """What the six claims need beyond the run table: BaLoRA's accuracy and ranking against the number
    of test-time draws S (the first S of 16 draws per crystal, recalibrated with the card's scaler),
    where its noise ended up, and its parameter and training-time overhead over LoRA."""
    from mp_gap_evaluate import noise_summary

    from matbalora.metrics import evaluate as metrics
    from matbalora.predict import Predictor, raw_total_std

    data = eval_data(open_store(allow_missing=True, **STORES.get(name, {})))
    y = data.targets[data.split.test]
    folders = {n: finished_run(n) for n in (name, lora)}  # runs/full_pool/NAME or its shipped copy in models/
    if folders[name] is None:
        raise SystemExit(f"claims needs a finished {name} in {RUNS} (or its shipped copy in models/)")
    pred = Predictor.load(folders[name])
    draws = pred.sample(data.part("test"), samples=max(sweep), seed=0)
    alea = np.sqrt(draws.aleatoric_var) if draws.aleatoric_var is not None else np.full(y.shape, np.nan)
    out: dict = {"run": name, "samples": {}}
    per_member = draws.by_member()  # [gap heads, draws, crystals]
    for s in sweep:
        g = draws.draws(0, s)  # S draws of every gap head
        std = pred.scaler.transform(raw_total_std(g.std(0, ddof=1), alea))
        m = metrics(g.mean(0), std, y)
        out["samples"][str(s)] = {"mae": m["mae"], "spearman": m["spearman"], "nonmetal_mae": m["nonmetal_mae"], "nonmetal_spearman": m["nonmetal_spearman"],
                                  "nll": m["nll"], "median_std_epistemic": float(np.median(g.std(0, ddof=1)))}
        print("S", s, json.dumps(out["samples"][str(s)]), flush=True)
    epistemic_only = metrics(draws.gaps.mean(0), draws.gaps.std(0, ddof=1), y)
    out["spearman_epistemic_only"] = {"all": epistemic_only["spearman"], "nonmetal": epistemic_only["nonmetal_spearman"]}
    aleatoric_only = metrics(draws.gaps.mean(0), alea, y)
    out["spearman_aleatoric_only"] = {"all": aleatoric_only["spearman"], "nonmetal": aleatoric_only["nonmetal_spearman"]}
    if len(per_member) > 1:  # the two epistemic parts apart: BaLoRA's draws within each head, and the heads' spread
        for part, part_std in (("draws", np.sqrt(per_member.var(1, ddof=1).mean(0))), ("heads", per_member.mean(1).std(0, ddof=1))):
            m = metrics(draws.gaps.mean(0), part_std, y)
            out[f"spearman_{part}_only"] = {"all": m["spearman"], "nonmetal": m["nonmetal_spearman"]}
    out["noise"] = noise_summary(pred.model)
    cards = {n: json.loads((f / "config.json").read_text()) for n, f in folders.items() if f is not None}
    out["parameters"] = {name: pred.model.parameter_counts()}  # as loaded, heads included
    if folders[lora] is not None:
        out["parameters"][lora] = Predictor.load(folders[lora]).model.parameter_counts()
    out["ms_per_crystal_epoch"] = {n: 1e3 * float(np.mean([h["seconds_per_structure"] for h in c["training"]["history"]])) for n, c in cards.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "claims.json", out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="+", choices=sorted(RECIPES))
    t.add_argument("--threads", type=int, default=1, help="torch threads (1: two jobs share the two cores)")
    v = sub.add_parser("revar", help="separate variance MLPs on a finished run (VARIANCE_REFITS)")
    v.add_argument("names", nargs="+", choices=sorted(VARIANCE_REFITS))
    v.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("rehead", help="a new gap head and separate variance MLPs on a finished run's frozen features (REHEADS)")
    r.add_argument("names", nargs="+", choices=sorted(REHEADS))
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("evaluate")
    c = sub.add_parser("claims")
    c.add_argument("balora", nargs="?", default="balora_full")
    c.add_argument("lora", nargs="?", default="lora_full_seed0")
    sh = sub.add_parser("ship")
    sh.add_argument("balora")
    sh.add_argument("ensemble_prefix", nargs="?", help="without it, the shipped ensemble stays")
    f = sub.add_parser("forest")
    f.add_argument("sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "train":
        for name in args.names:
            train(name, args.threads)
    elif args.cmd == "revar":
        for name in args.names:
            revar(name, args.threads)
    elif args.cmd == "rehead":
        for name in args.names:
            rehead(name, args.threads)
    elif args.cmd == "evaluate":
        evaluate()
    elif args.cmd == "claims":
        claims(args.balora, args.lora)
    elif args.cmd == "ship":
        ship(args.balora, args.ensemble_prefix)
    elif args.cmd == "forest":
        forest(args.sizes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
