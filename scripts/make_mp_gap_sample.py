"""Write data/mp_gap_sample/mp_gap_sample.extxyz.gz: a seeded random sample of Matbench fold-0 *test*
entries of ``../shared/data/mp_gap/mp_gap.extxyz.gz`` (Materials Project, CC BY 4.0), so the notebooks
run in a clone without ``../shared``. Frames are copied verbatim (text), never re-written.

    python scripts/make_mp_gap_sample.py [--n 300] [--seed 0] [--source PATH]

The shipped models train on the other Matbench folds only, so no sampled crystal was seen in training.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

import numpy as np

from matbalora.data.splits import matbench_fold_ids

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"
OUT = REPO / "data" / "mp_gap_sample" / "mp_gap_sample.extxyz.gz"
INDEX = re.compile(r"\bmatbench_index=(\d+)\b")


def frames(path: Path):
    """(matbench_index, [lines]) of every frame of an extended-XYZ text file (gzip)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        while count := fh.readline():
            header = fh.readline()
            body = [fh.readline() for _ in range(int(count))]
            yield int(INDEX.search(header).group(1)), [count, header, *body]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="crystals in the sample")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the full mp_gap.extxyz.gz")
    args = ap.parse_args()
    folds = matbench_fold_ids()
    indices = [i for i, _ in frames(args.source)]
    test = np.array([i for i in indices if folds[i] == 0])
    chosen = set(np.random.default_rng(args.seed).choice(test, size=args.n, replace=False).tolist())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as out:  # mtime 0: the same bytes on every run
        for i, lines in frames(args.source):
            if i in chosen:
                out.write("".join(lines).encode())
    print(f"{OUT}: {len(chosen)} of {len(test)} fold-0 test entries ({len(indices)} frames), seed {args.seed}")


if __name__ == "__main__":
    main()
