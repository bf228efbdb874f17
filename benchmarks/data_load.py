"""Data-layer timings on the shared mp_gap file.

1. ``load_dataset`` of every frame into validated pymatgen Structures (rejections by reason);
2. the graph cache for the first N admitted structures with the pretrained CHGNet 0.3.0
   converter (build time with ``--workers``, disk size, and the time to read it back).

    python benchmarks/data_load.py [--data PATH] [--n-graphs 10000] [--workers 2] [--cache-dir DIR]

The cache goes to a temporary folder that is removed afterwards unless ``--cache-dir`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from matbalora.data.graph_cache import GraphCache
from matbalora.data.info import format_summary, summarize
from matbalora.data.readers import load_dataset

DEFAULT_DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"


def disk_usage(root: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under ``root``."""
    files = apparent = allocated = 0
    for path in root.rglob("*.safetensors"):
        stat = path.stat()
        files += 1
        apparent += stat.st_size
        allocated += stat.st_blocks * 512
    return files, apparent, allocated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-graphs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--max-structures", type=int, default=None, help="load only the first N frames")
    args = parser.parse_args()

    start = time.perf_counter()
    ds = load_dataset(args.data, max_structures=args.max_structures)
    load_s = time.perf_counter() - start
    n_read = ds.provenance["n_read"]
    print(
        f"load_dataset({args.data.name}): {n_read:,} frames read, {len(ds):,} admitted in {load_s:.1f} s "
        f"({1e3 * load_s / max(n_read, 1):.2f} ms/frame)"
    )
    print(f"rejections by reason: {ds.rejection_counts() or 'none'}")
    for rejection in ds.rejected[:10]:
        print(f"  {rejection.id_or_path}: {rejection.reason} ({rejection.detail})")
    print(format_summary(summarize(ds)))

    from matbalora.backbones.chgnet import FAMILY as CHGNET
    from matbalora.backbones.chgnet import load_chgnet

    model = load_chgnet()
    subset = ds.subset(range(min(args.n_graphs, len(ds))))
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="matbalora-graphs-"))
    try:
        cache = GraphCache(root, converter=model.graph_converter, backbone_version=CHGNET.backbone_version(model))
        start = time.perf_counter()
        cache.graphs(subset.structures, ids=subset.ids, workers=args.workers, progress=True)
        build_s = time.perf_counter() - start
        files, apparent, allocated = disk_usage(root)
        print(
            f"graph cache build: {len(subset):,} structures ({sum(len(s) for s in subset.structures):,} atoms), "
            f"workers={args.workers}: {build_s:.1f} s ({len(subset) / build_s:.1f} graphs/s), {cache.stats}"
        )
        print(
            f"graph cache on disk: {files:,} files, {apparent / 2**20:.1f} MiB apparent, "
            f"{allocated / 2**20:.1f} MiB allocated ({apparent / max(files, 1) / 1024:.1f} KiB/graph)"
        )
        start = time.perf_counter()
        cache.graphs(subset.structures, ids=subset.ids, workers=1, progress=False)
        print(f"graph cache read back (verified): {time.perf_counter() - start:.1f} s, {cache.stats}")
    finally:
        if args.cache_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
