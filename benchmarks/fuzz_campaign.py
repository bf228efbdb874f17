"""Fuzz campaign over every input reader: mutated real files in, prediction or named rejection out.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_campaign.py [--cases 10000] [--seed 0] [--no-predict]

The generators are the ones of the CI subset (tests/fuzz_cases.py): seeds are data/examples/*.cif
and CIF/POSCAR/extended-XYZ/JSON files written from textbook crystals; each case applies 0-3
mutations (truncation, byte flips, splices, line shuffles, huge/NaN/inf numbers, odd elements,
other encodings, a million atoms declared, broken cells, broken syntax; 10% gzipped). Formats take
turns. Every case runs under a CPU-time bound (SIGPROF) and an address-space cap, is read with
``read_structures`` and every admitted structure is predicted by a tiny BaLoRA CHGNet. Outcomes
are counted per entry: ``accepted`` (finite prediction), each rejection reason, or ``failure:...``
(an exception escaped, a time-out, a row the predictor could not handle). Each distinct failure
keeps its recipe (``--seed``, case index, seed file, mutations) and a line-minimised input.
The hostile classes of issue 18 take part twice: as mutations (class-lookup JSON, over-long lines,
repeated CIF operations and blocks, POSCAR count mismatches; an input that must be refused and is
accepted is a failure), and as a fixed suite (``fuzz_cases.hostile_files``/``hostile_paths``: gzip
bombs, the issue's CIF, FIFOs, broken links and loops) run once per campaign under the same bounds.
Results: benchmarks/results/fuzz_campaign.json, written atomically. A case stuck in C code (where
the alarm cannot reach) ends the run after ``--hang-seconds`` with stack traces, and
``fuzz_campaign.inflight.json`` next to the results names that case.
"""

from __future__ import annotations

import argparse
import base64
import faulthandler
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fuzz_cases as F  # noqa: E402  (tests/ is not a package)

from matbalora.atomic import write_json  # noqa: E402
from matbalora.data import bounded, formats, precheck, validation  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fuzz_campaign.json"


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def failures_of(outcomes: list[str]) -> list[str]:
    return [o for o in outcomes if o.startswith("failure")]


def minimise(case: F.Case, signature: str, folder: Path, run) -> bytes:
    """Drop lines while the same failure persists (at most 200 tries)."""
    lines = case.data.split(b"\n")
    tries, i = 0, 0
    while i < len(lines) and tries < 200:
        candidate = lines[:i] + lines[i + 1 :]
        trial = F.Case(case.fmt, case.seed_name, case.ops, b"\n".join(candidate), case.gz)
        tries += 1
        if signature in failures_of(run(F.write_case(trial, folder, -1))[0]):
            lines = candidate
        else:
            i += 1
    return b"\n".join(lines)


def hostile_suite(folder: Path, run) -> dict:
    """Every fixed hostile input once: files must end in rejections only, paths that are not
    regular files in ``unreadable`` (a folder of them also reads its one good file)."""
    cases: list[tuple[str, Path, list[str] | None]] = []
    for name, data in F.hostile_files().items():
        (folder / name).write_bytes(data)
        cases.append((name, folder / name, None))
    *alone, odd = F.hostile_paths(folder)
    cases += [(path.name, path, [validation.UNREADABLE]) for path in alone]
    cases.append(("folder of odd entries", odd, sorted(["accepted"] + [validation.UNREADABLE] * 3)))
    outcomes: Counter = Counter()
    failures, seconds = [], {}
    for name, path, expected in cases:
        found, spent = run(path)
        outcomes.update(found)
        seconds[name] = round(spent, 3)
        ok = sorted(found) == expected if expected is not None else found and "accepted" not in found
        if not ok or failures_of(found):
            failures.append({"input": name, "outcomes": found})
    return {"cases": len(cases), "outcomes": dict(outcomes.most_common()), "failures": failures, "cpu_seconds": seconds}


def versions() -> dict[str, str]:
    import ase
    import chgnet
    import pymatgen.core
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "pymatgen": pymatgen.core.__version__, "ase": ase.__version__,
            "chgnet": chgnet.__version__, "torch": torch.__version__, "git_commit": commit}  # fmt: skip


def campaign(args: argparse.Namespace, folder: Path) -> dict:
    seeds = F.build_seeds()
    predictor = None if args.no_predict else F.tiny_predictor(folder)

    def run(path: Path) -> tuple[list[str], float]:
        # a hang inside C code holds the GIL and ignores the alarm: exit with stacks instead
        faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
        try:
            with F.memory_limit(int(args.memory_gb * 2**30)):
                return F.run_case(path, predictor=predictor, seconds=args.case_seconds)
        finally:
            faulthandler.cancel_dump_traceback_later()

    per_reader: dict[str, dict] = {
        fmt: {"cases": 0, "entries": Counter(), "ops": Counter(), "seconds": []} for fmt in F.FORMATS
    }
    failures: dict[tuple[str, str], dict] = {}
    slowest: list[tuple[float, dict]] = []
    start = time.perf_counter()
    inflight = args.out.with_name(args.out.stem + ".inflight.json")  # names the case a hang stopped at
    inflight.parent.mkdir(parents=True, exist_ok=True)
    for index in range(args.cases):
        fmt = F.FORMATS[index % len(F.FORMATS)]
        case = F.make_case(case_rng(args.seed, index), seeds, fmt)
        path = F.write_case(case, folder, index)
        inflight.write_text(json.dumps({"seed": args.seed, "case": index, "format": fmt, "mutations": case.ops}))
        outcomes, seconds = run(path)
        outcomes = F.judge(case, outcomes)
        path.unlink()
        stats = per_reader[fmt]
        stats["cases"] += 1
        stats["entries"].update(outcomes)
        stats["ops"].update(case.ops or ["none"])
        stats["seconds"].append(seconds)
        recipe = {"seed": args.seed, "case": index, "format": fmt, "seed_file": case.seed_name, "mutations": case.ops,
                  "gzipped": case.gz, "cpu_seconds": round(seconds, 3)}  # fmt: skip
        slowest = sorted([*slowest, (seconds, recipe)], key=lambda item: -item[0])[:5]
        for signature in dict.fromkeys(failures_of(outcomes)):
            key = (fmt, signature)
            if key not in failures:
                small = minimise(case, signature, folder, run)
                failures[key] = {"format": fmt, "failure": signature, "count": 0, "recipe": recipe,
                                 "minimal_input_bytes": len(small),
                                 "minimal_input_base64": base64.b64encode(small[:4096]).decode()}  # fmt: skip
            failures[key]["count"] += 1
        if args.progress and (index + 1) % 500 == 0:
            n_fail = sum(f["count"] for f in failures.values())
            print(f"{index + 1} cases, {n_fail} with failures, {time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    inflight.unlink(missing_ok=True)
    hostile = hostile_suite(folder, run)
    readers = {}
    for fmt, stats in per_reader.items():
        secs = sorted(stats["seconds"])
        readers[fmt] = {
            "cases": stats["cases"],
            "entries": dict(stats["entries"].most_common()),
            "mutations_applied": dict(stats["ops"].most_common()),
            "case_cpu_seconds": {
                "mean": round(sum(secs) / max(1, len(secs)), 4),
                "p99": round(secs[int(0.99 * (len(secs) - 1))], 3) if secs else None,
                "max": round(secs[-1], 3) if secs else None,
            },
        }
    totals: Counter = Counter()
    for stats in per_reader.values():
        totals.update(stats["entries"])
    return {
        "cases": args.cases,
        "seed": args.seed,
        "predict_accepted": not args.no_predict,
        "limits": {
            "case_cpu_seconds": args.case_seconds,
            "case_cpu_seconds_per_mib": 2.0,
            "extra_address_space_gb": args.memory_gb,
            "max_atoms": validation.DEFAULT_MAX_ATOMS,
            "max_density_atoms_per_A3": validation.MAX_DENSITY,
            "max_search_images": validation.MAX_SEARCH_IMAGES,
            "max_search_cells": validation.MAX_SEARCH_CELLS,
            "max_cif_symops": precheck.MAX_SYMOPS,
            "max_text_chars": precheck.MAX_TEXT_CHARS,
            "max_cif_blocks": precheck.MAX_CIF_BLOCKS,
            "max_cif_op_sites": precheck.MAX_CIF_OP_SITES,
            "max_line_chars": bounded.MAX_LINE_CHARS,
            "gzip_cap": f"max({bounded.MIN_GZIP_BYTES} bytes, {bounded.MAX_GZIP_RATIO} x compressed size)",
            "max_json_chars": formats.MAX_JSON_CHARS,
            "max_failed_entries_per_file": formats.MAX_FAILED_ENTRIES,
        },
        "wall_seconds": round(wall, 1),
        "hostile_suite": hostile,
        "outcomes": dict(totals.most_common()),
        "cases_with_failures": sum(f["count"] for f in failures.values()),
        "distinct_failures": list(failures.values()),
        "readers": readers,
        "slowest_cases": [recipe for _, recipe in slowest],
        "seed_files": {fmt: [name for name, _ in files] for fmt, files in seeds.items()},
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of fuzz cases (formats take turns)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed: case i uses random.Random(f'{seed}:{i}')")
    parser.add_argument("--case-seconds", type=float, default=10.0, help="CPU seconds per case (+2 s per MiB of input)")
    parser.add_argument(
        "--hang-seconds", type=float, default=300.0, help="wall seconds before a stuck case ends the run"
    )
    parser.add_argument("--memory-gb", type=float, default=3.0, help="address space allowed above the start-up size")
    parser.add_argument("--no-predict", action="store_true", help="read and validate only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--progress", action="store_true", help="print a line every 500 cases")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    with tempfile.TemporaryDirectory(prefix="fuzz_") as tmp:
        result = campaign(args, Path(tmp))
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    write_json(args.out, result)
    print(f"{result['cases']} cases in {result['wall_seconds']} s: {result['outcomes']}")
    print(f"distinct failures: {len(result['distinct_failures'])} -> {args.out}")
    print(f"hostile suite: {result['hostile_suite']['cases']} inputs, {len(result['hostile_suite']['failures'])} failures")


if __name__ == "__main__":
    main()
