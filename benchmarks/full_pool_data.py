"""The full-pool protocol on ``shared/data/mp_gap``: every Matbench fold-0-free crystal, stored once as
frozen-prefix features on disk (:mod:`matbalora.backbones.prefix_store`).

* test: the same 1,000 Matbench fold-0 crystals as every earlier benchmark (``SplitSizes(seed=0)``
  draws them first with the same generator, so ``select_rows`` and this module agree);
* validation: the first 1,000 of a seeded permutation of the other folds;
* training: the rest of that permutation, in order, so that the learning-curve subsets
  (2,000, 10,000, 40,000, all) are nested prefixes of one another and live in the first shards.

    python benchmarks/full_pool_data.py cache --worker 0 --workers 2   # one process per core; resumable

Other stores of the same pool (the recipe study): ``--block 2`` (CHGNet adapters in the last two
blocks), ``--backbone sevennet`` (SevenNet-0, last interaction block); ``--n-train 10000`` builds only
the shards of validation, test and the first 10,000 training crystals (a later call completes it).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mp_gap_data import MP_GAP  # noqa: E402

from matbalora.backbones.prefix_store import PrefixStore, build_prefix_store, store_key  # noqa: E402
from matbalora.data.entries import build_dataset  # noqa: E402
from matbalora.data.extxyz import iter_frames, parse_frame  # noqa: E402
from matbalora.data.formats import atoms_entry  # noqa: E402
from matbalora.data.splits import matbench_fold_ids  # noqa: E402
from matbalora.finetune import default_cache_dir  # noqa: E402

log = logging.getLogger("full_pool")
N_TEST, N_VAL, SEED, SHARD_SIZE, BLOCK, MAX_ATOMS = 1000, 1000, 0, 512, 3, 500
_MID = re.compile(r"material_id=(\S+)")
_MBI = re.compile(r"matbench_index=(\d+)")


@dataclass(frozen=True)
class Pool:
    """Material ids of each part, in store order (val, test, train)."""

    val: list[str]
    test: list[str]
    train: list[str]

    @property
    def ids(self) -> list[str]:
        return self.val + self.test + self.train

    def train_subset(self, n: int | None) -> list[str]:
        return self.train if n is None else self.train[:n]


def raw_frames(path: Path = MP_GAP) -> tuple[list, list[str], np.ndarray]:
    """The pool's frames, Materials Project ids and Matbench indices (read once per process and path)."""
    return _read_frames(Path(path))


@lru_cache(maxsize=1)  # keyed on the resolved path: raw_frames() and raw_frames(MP_GAP) share one read
def _read_frames(path: Path) -> tuple[list, list[str], np.ndarray]:
    frames = list(iter_frames(path))
    ids = [_MID.search(f.comment).group(1) for f in frames]
    mb = np.array([int(_MBI.search(f.comment).group(1)) for f in frames])
    return frames, ids, mb


def full_pool(path: Path = MP_GAP) -> Pool:
    _, ids, mb = raw_frames(path)
    fold = matbench_fold_ids()[mb]
    rng = np.random.default_rng(SEED)
    test = np.sort(rng.choice(np.flatnonzero(fold == 0), N_TEST, replace=False))  # as mp_gap_data.select_rows
    rest = rng.permutation(np.flatnonzero(fold != 0))
    return Pool(val=[ids[i] for i in rest[:N_VAL]], test=[ids[i] for i in test], train=[ids[i] for i in rest[N_VAL:]])


@lru_cache(maxsize=1)
def data_fingerprint(path: Path = MP_GAP) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: backbone family -> the block its last-block stores start at
LAST_BLOCK = {"chgnet": BLOCK, "sevennet": 4}


def store_root(*, backbone: str = "chgnet", block: int | None = None) -> Path:
    """Where the pool's store of ``backbone`` entering ``block`` (default: its last block) lives; the
    CHGNet last-block key is the one every earlier store was built under."""
    from matbalora.backbones import get_backbone

    backbone_version = "0.3.0" if backbone == "chgnet" else f"sevenn {get_backbone(backbone).package_version()}"
    pool = full_pool()
    block = LAST_BLOCK[backbone] if block is None else block
    extra = {"max_atoms": MAX_ATOMS, **({} if backbone == "chgnet" else {"family": backbone})}
    key = store_key(backbone_version=backbone_version, block=block, data_fingerprint=data_fingerprint(), ids=pool.ids,
                    shard_size=SHARD_SIZE, extra=extra)
    return default_cache_dir() / "prefix_store" / key[:24]


def n_positions(n_train: int | None) -> int | None:
    """Store positions holding validation, test and the first ``n_train`` training crystals."""
    return None if n_train is None else N_VAL + N_TEST + n_train


def store_model(backbone: str = "chgnet"):
    """The pretrained model whose frozen blocks fill a store (last-block BaLoRA adapters: every
    earlier block is frozen, so any store block up to the last is valid)."""
    from matbalora.model import BandGapModel

    return BandGapModel.from_pretrained("balora", backbone=backbone)


def _loader(model, block: int):
    backbone, family = model.backbone, model.family
    frames, ids, _ = raw_frames()
    where = {sid: i for i, sid in enumerate(ids)}
    order = full_pool().ids

    def load(positions):
        rows = [where[order[p]] for p in positions]
        entries = (atoms_entry(parse_frame(frames[r]), ids[r], target_key="band_gap", max_atoms=MAX_ATOMS) for r in rows)
        ds = build_dataset(entries, provenance={"source": str(MP_GAP)})
        rejected = {r.id_or_path: f"{r.reason}: {r.detail}" for r in ds.rejected}
        graphs, targets, kept = [], [], []
        for s, t, sid in zip(ds.structures, ds.targets, ds.ids):
            try:
                graphs.append(model.structure_to_graph(s, graph_id=sid))
            except Exception as exc:  # isolated atoms, converter limits: reported per crystal
                rejected[sid] = f"graph conversion: {type(exc).__name__}: {exc}"
                continue
            targets.append(float(t))
            kept.append(sid)
        prefixes = family.compute_prefixes(backbone, graphs, block, batch_size=32, progress=False) if graphs else []
        return prefixes, targets, kept, rejected

    return load


def build(worker: int, workers: int, *, backbone: str = "chgnet", block: int | None = None, n_train: int | None = None) -> Path:
    torch.set_num_threads(1)
    model = store_model(backbone)
    last = model.family.prefix_block(model.backbone, model.method)  # the store model adapts only the last block
    if LAST_BLOCK[backbone] != last:
        raise RuntimeError(f"LAST_BLOCK[{backbone!r}] = {LAST_BLOCK[backbone]}, but the pretrained model's last block is {last}")
    block = last if block is None else block
    root = store_root(backbone=backbone, block=block)
    pool = full_pool()
    t0 = time.perf_counter()
    build_prefix_store(root, ids=pool.ids, load_shard=_loader(model, block), key=root.name, block=block, shard_size=SHARD_SIZE,
                       worker=worker, workers=workers, family=backbone, upto=n_positions(n_train),
                       info={"protocol": "full pool, benchmarks/full_pool_data.py", "backbone": backbone, "n_val": len(pool.val),
                             "n_test": len(pool.test), "n_train": len(pool.train)})
    log.info("worker %d/%d done in %.0f s: %s", worker, workers, time.perf_counter() - t0, root)
    return root


def open_store(*, verify: bool = True, allow_missing: bool = False, backbone: str = "chgnet", block: int | None = None) -> PrefixStore:
    return PrefixStore(store_root(backbone=backbone, block=block), verify=verify, allow_missing=allow_missing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="build (or resume) the full-pool prefix store")
    c.add_argument("--worker", type=int, default=0)
    c.add_argument("--workers", type=int, default=1)
    for sp in (c, sub.add_parser("info", help="size and rejections of the finished store")):
        sp.add_argument("--backbone", default="chgnet", choices=sorted(LAST_BLOCK))
        sp.add_argument("--block", type=int, default=None, help="the block the stored features enter (default: the last)")
    c.add_argument("--n-train", type=int, default=None, help="build only validation, test and the first N training crystals")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "cache":
        print(build(args.worker, args.workers, backbone=args.backbone, block=args.block, n_train=args.n_train))
    else:
        store = open_store(backbone=args.backbone, block=args.block, allow_missing=True)
        print(f"{store.root}: {len(store.kept)} crystals in {store.n_shards} shards, {store.nbytes() / 1e9:.2f} GB, rejected {len(store.rejected())}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
