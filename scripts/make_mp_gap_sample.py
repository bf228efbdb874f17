"""Write data/mp_gap_sample/mp_gap_sample.extxyz.gz: a seeded random sample of Matbench fold-0 *test*
entries of ``../shared/data/mp_gap/mp_gap.extxyz.gz`` (Materials Project, CC BY 4.0), so the notebooks
run in a clone without ``../shared``. Frames are copied verbatim (text), never re-written.

    python scripts/make_mp_gap_sample.py [--n 300] [--seed 0] [--source PATH] [--out PATH]

The shipped models train on the other Matbench folds only, so no sampled crystal was seen in training.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

import numpy as np

from matbalora.atomic import atomic_write
from matbalora.data.splits import matbench_fold_ids, matbench_index_from_ids

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"
OUT = REPO / "data" / "mp_gap_sample" / "mp_gap_sample.extxyz.gz"
INDEX = re.compile(r"\bmatbench_index=(\d+)\b")
MATERIAL_ID = re.compile(r"\bmaterial_id=(\S+)")


def matbench_row(header: str, path: Path, frame: int) -> int:
    """The Matbench row of a frame: its ``matbench_index``, or else its ``material_id`` when that is
    a Matbench id ``mb-mp-gap-NNNNNN`` (as ``write_extxyz(from_matbench(...))`` writes it)."""
    if (m := INDEX.search(header)) is not None:
        return int(m.group(1))
    if (m := MATERIAL_ID.search(header)) is not None:
        try:
            return int(matbench_index_from_ids([m.group(1).strip('"')])[0])
        except ValueError:
            pass
    raise SystemExit(f"{path}: frame {frame} has no matbench_index and no Matbench material_id (mb-mp-gap-NNNNNN)")


def frames(path: Path):
    """(matbench_index, [lines]) of every frame of an extended-XYZ text file (gzip)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        frame = 0
        while count := fh.readline():
            header = fh.readline()
            body = [fh.readline() for _ in range(int(count))]
            yield matbench_row(header, path, frame), [count, header, *body]
            frame += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="crystals in the sample")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the full mp_gap.extxyz.gz")
    ap.add_argument("--out", type=Path, default=OUT, help="where the sample goes")
    args = ap.parse_args(argv)
    folds = matbench_fold_ids()
    indices = [i for i, _ in frames(args.source)]
    test = np.array([i for i in indices if folds[i] == 0])
    if not 0 < args.n <= len(test):
        raise SystemExit(f"{args.source}: --n {args.n} must be 1..{len(test)} (its fold-0 test entries)")
    chosen = set(np.random.default_rng(args.seed).choice(test, size=args.n, replace=False).tolist())
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with gzip.GzipFile(tmp, "wb", mtime=0) as out:  # mtime 0: the same bytes on every run
            for i, lines in frames(args.source):
                if i in chosen:
                    out.write("".join(lines).encode())

    atomic_write(args.out, write)  # never half written
    print(f"{args.out}: {len(chosen)} of {len(test)} fold-0 test entries ({len(indices)} frames), seed {args.seed}")


if __name__ == "__main__":
    main()
