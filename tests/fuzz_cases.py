"""Input fuzzing shared by tests/test_fuzz_inputs.py (seeded CI subset) and benchmarks/fuzz_campaign.py.

Seeds are real files (data/examples/*.cif) and small files written from textbook crystals in every
reader's format. A case is a seed put through a few mutations (truncation, byte flips, other
encodings, huge/NaN/inf numbers, broken cells, a million atoms declared, broken syntax); it is
read with ``read_structures`` (the reader ``matbalora predict`` and ``screen`` use) and every
admitted structure is predicted. ``run_case`` returns the outcome of each entry: ``accepted``, a
named rejection reason, or ``failure:...`` for anything else (an exception, a time-out).

Hostile classes (issue 18): mutations that inject pymatgen class-lookup objects into JSON, lines
longer than the reader's bound, repeated CIF symmetry operations and extra data blocks, and POSCAR
count lines that disagree with the coordinate lines; a case whose last mutation is one that must be
refused (``MUST_REJECT``) fails when every entry is accepted (``judge``). ``hostile_files`` and
``hostile_paths`` are fixed inputs of each class (gzip bombs, the issue's CIF, FIFOs, broken links).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import resource
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"
FORMATS = ("cif", "poscar", "extxyz", "json")
SUFFIX = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz", "json": ".json"}
EXTREME = ["1e308", "1e400", "-1e400", "-1e300", "1e17", "nan", "NaN", "inf", "-inf", "Infinity", "0", "-0",
           "1e-300", "-5.43", "1000000", "-1", "9" * 400, "0x1F", "1,5", ""]  # fmt: skip


class CaseTimeout(BaseException):
    """Raised by the CPU-time alarm when a case runs past its time bound (BaseException: no library
    ``except Exception`` can swallow it)."""


# ---------------------------------------------------------------- seeds


def _crystals():
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure(Lattice.cubic(5.43), ["Si"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    perovskite = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                           [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])  # fmt: skip
    wurtzite = Structure(Lattice.hexagonal(3.25, 5.21), ["Zn", "Zn", "O", "O"],
                         [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.382], [2 / 3, 1 / 3, 0.882]])  # fmt: skip
    return {"NaCl": nacl, "Si": si, "SrTiO3": perovskite, "ZnO": wurtzite}


def build_seeds() -> dict[str, list[tuple[str, bytes]]]:
    """``format -> [(name, file bytes)]``: real CIFs plus every reader's format written from crystals."""
    from ase import Atoms
    from ase.io import write
    from pymatgen.io.cif import CifWriter

    crystals = _crystals()
    seeds: dict[str, list[tuple[str, bytes]]] = {fmt: [] for fmt in FORMATS}
    seeds["cif"] += [(p.stem, p.read_bytes()) for p in sorted(EXAMPLES.glob("*.cif"))]
    for name, s in crystals.items():
        seeds["cif"].append((f"{name}_sym", str(CifWriter(s, symprec=0.01)).encode()))  # symmetry to expand
        seeds["poscar"].append((name, s.to(fmt="poscar").encode()))
    seeds["json"].append(("single", json.dumps(crystals["Si"].as_dict()).encode()))
    records = [{"id": f"m-{i}", "structure": s.as_dict(), "band_gap": 1.0 + i} for i, s in enumerate(crystals.values())]
    seeds["json"].append(("records", json.dumps(records).encode()))
    frames = []
    for i, s in enumerate(crystals.values()):
        atoms = Atoms([site.specie.symbol for site in s], positions=s.cart_coords, cell=s.lattice.matrix, pbc=True)
        atoms.info.update(material_id=f"m-{i}", band_gap=0.5 * i)
        frames.append(atoms)
    for name, part in (("one", frames[:1]), ("all", frames)):
        from io import StringIO

        buf = StringIO()
        write(buf, part, format="extxyz")
        seeds["extxyz"].append((name, buf.getvalue().encode()))
    return seeds


# ---------------------------------------------------------------- mutations

_NUMBER = re.compile(rb"(?<![A-Za-z_])[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def truncate(rng: random.Random, data: bytes, fmt: str) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def flip_bytes(rng: random.Random, data: bytes, fmt: str) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(256)
    return bytes(out)


def splice(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Delete, duplicate or insert a chunk (garbage or a piece of the file)."""
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    kind = rng.choice(["delete", "duplicate", "garbage"])
    if kind == "delete":
        return data[:i] + data[j:]
    if kind == "duplicate":
        return data[:j] + data[i:j] + data[j:]
    return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]


def shuffle_lines(rng: random.Random, data: bytes, fmt: str) -> bytes:
    lines = data.split(b"\n")
    kind = rng.choice(["drop", "dup", "swap"])
    k = rng.randrange(len(lines))
    if kind == "drop":
        del lines[k]
    elif kind == "dup":
        lines.insert(k, lines[k])
    else:
        m = rng.randrange(len(lines))
        lines[k], lines[m] = lines[m], lines[k]
    return b"\n".join(lines)


def extreme_numbers(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Replace a few numbers by huge, tiny, NaN, inf, negative or malformed ones."""
    spans = [m.span() for m in _NUMBER.finditer(data)]
    if not spans:
        return data
    out = data
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.randint(1, 4))), reverse=True):
        out = out[:start] + rng.choice(EXTREME).encode() + out[end:]
    return out


_SYMBOL = re.compile(rb"\b(?:Na|Cl|Si|Sr|Ti|O|Zn|Al|Cu|Ga|As|Li|F|Mg)\b")
ODD_SPECIES = [
    "Am",
    "Cm",
    "Og",
    "Ts",
    "Pu",
    "U",
    "H",
    "He",
    "D",
    "T",
    "X",
    "Xx",
    "Uuo",
    "Na+",
    "Fe3+",
    "O2-",
    "e",
    "1",
    "",
]


def swap_element(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Replace element symbols by heavy (Z > 94), dummy, charged or made-up ones."""
    spans = [m.span() for m in _SYMBOL.finditer(data)]
    out = data
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.randint(1, 3))), reverse=True):
        out = out[:start] + rng.choice(ODD_SPECIES).encode() + out[end:]
    return out


def encoding(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Other encodings: latin-1 bytes, UTF-16, a BOM, NUL bytes, or pure binary garbage."""
    kind = rng.choice(["latin1", "utf16", "bom", "nul", "garbage"])
    text = data.decode("utf-8", errors="replace")
    if kind == "latin1":
        k = rng.randrange(len(text) + 1)
        return (text[:k] + " Å° é " + text[k:]).encode("latin-1", errors="replace")
    if kind == "utf16":
        return text.encode("utf-16")
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    if kind == "nul":
        k = rng.randrange(len(data) + 1)
        return data[:k] + b"\x00" * rng.randint(1, 16) + data[k:]
    return rng.randbytes(rng.randint(0, 2048))


def _lines_replace(data: bytes, index: int, new: bytes) -> bytes:
    lines = data.split(b"\n")
    if index < len(lines):
        lines[index] = new
    return b"\n".join(lines)


def declare_many(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Declare (or expand to) far more atoms than allowed: 10^6 or so."""
    big = rng.choice([1_000_000, 10**9, 501, 100_000])
    if fmt == "poscar":
        lines = data.split(b"\n")
        idx = 6 if len(lines) > 6 and not lines[5].strip()[:1].isdigit() else 5
        return _lines_replace(data, idx, f"{big} {rng.randint(0, 3)}".encode())
    if fmt == "extxyz":
        return str(big).encode() + data[data.index(b"\n") :] if b"\n" in data else data
    if fmt == "json":
        obj = json.loads(data)
        target = (
            obj if isinstance(obj, dict) and "sites" in obj else obj[0]["structure"] if isinstance(obj, list) else obj
        )
        target["sites"] = target["sites"][:4] * rng.choice([200, 2000, 20_000])  # up to 80,000 sites, a few MB
        return json.dumps(obj).encode()
    # CIF: many general positions in a high-symmetry group, or a long explicit symmetry loop
    if rng.random() < 0.5:
        rows = "".join(
            f"O{i} O {rng.random():.4f} {rng.random():.4f} {rng.random():.4f} 1\n"
            for i in range(rng.choice([4, 40, 600]))
        )
        return (b"data_big\n_cell_length_a 30\n_cell_length_b 30\n_cell_length_c 30\n_cell_angle_alpha 90\n"
                b"_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'F m -3 m'\nloop_\n"
                b"_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
                b"_atom_site_fract_z\n_atom_site_occupancy\n" + rows.encode())  # fmt: skip
    ops = "".join(f"'x+{i / 997:.5f},y,z'\n" for i in range(rng.choice([50, 300, 5000])))
    return data.replace(b"loop_\n", b"loop_\n_symmetry_equiv_pos_as_xyz\n" + ops.encode() + b"loop_\n", 1)


def bad_cell(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Zero, negative (left-handed), collinear, tiny or huge cells, via each format's lattice text."""
    kind = rng.choice(["zero", "negative", "collinear", "tiny", "huge", "angles"])
    rows = {"zero": ["0 0 0", "0 4 0", "0 0 4"], "negative": ["0 4 0", "4 0 0", "0 0 4"],
            "collinear": ["4 0 0", "8 0 0", "0 0 4"], "tiny": ["0.01 0 0", "0 0.01 0", "0 0 0.01"],
            "huge": ["1e9 0 0", "0 1e9 0", "0 0 1e9"], "angles": ["4 0 0", "4 1e-7 0", "0 0 4"]}[kind]  # fmt: skip
    if fmt == "poscar":
        for i, row in enumerate(rows):
            data = _lines_replace(data, 2 + i, row.encode())
        return data
    if fmt == "extxyz":
        return re.sub(rb'Lattice="[^"]*"', f'Lattice="{" ".join(rows)}"'.encode(), data)
    if fmt == "json":
        obj = json.loads(data)
        target = obj if isinstance(obj, dict) else obj[0]["structure"]
        target["lattice"] = {"matrix": [[float(x) for x in r.split()] for r in rows]}
        return json.dumps(obj).encode()
    values = {"zero": (0, 4, 4, 90, 90, 90), "negative": (-4, 4, 4, 90, 90, 90), "collinear": (4, 4, 4, 0, 0, 0),
              "tiny": (0.01, 0.01, 0.01, 90, 90, 90), "huge": (1e9, 1e9, 1e9, 90, 90, 90),
              "angles": (4, 4, 4, 179.9999, 90, 90)}[kind]  # fmt: skip
    for key, value in zip(
        ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"), values, strict=True
    ):
        data = re.sub(rf"_cell_{key}\s+\S+".encode(), f"_cell_{key} {value}".encode(), data)
    return data


def broken_syntax(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Deeply nested or unterminated constructs."""
    depth = rng.choice([10, 1000, 100_000])
    kind = rng.choice(["nest", "quote", "cut_tokens", "gzip_garbage"])
    if kind == "gzip_garbage":
        packed = gzip.compress(data)
        return packed[: rng.randrange(len(packed) + 1)]
    if kind == "nest":
        pre = {"json": b"[" * depth, "cif": b"loop_\n" * depth, "extxyz": b'"' * depth, "poscar": b"[" * depth}[fmt]
        return pre + data if rng.random() < 0.5 else data + pre
    if kind == "quote":
        k = rng.randrange(len(data) + 1)
        return data[:k] + rng.choice([b'"', b"'", b"\n;", b"{", b"\\"]) + data[k:]
    return b" ".join(data.split()[: rng.randrange(1, 40)])


def class_lookup(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """JSON: a site property holding a ``{"@module", "@class"}`` object (MontyDecoder would import it)."""
    obj = json.loads(data)
    target = obj if isinstance(obj, dict) else obj[rng.randrange(len(obj))]["structure"]
    site = target["sites"][rng.randrange(len(target["sites"]))]
    module, cls = rng.choice([("os", "system"), ("subprocess", "Popen"), ("torch", "Tensor"), ("numpy", "array"),
                              ("pymatgen.core", "Structure"), ("fuzz_not_a_module", "X")])
    site.setdefault("properties", {})["payload"] = {"@module": module, "@class": cls, "data": [0] * 3}
    return json.dumps(obj).encode()


def long_line(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """A line just above the streaming bound (MAX_LINE_CHARS), in place of or after a random line."""
    from matbalora.data.bounded import MAX_LINE_CHARS

    lines = data.split(b"\n")
    k = rng.randrange(len(lines))
    lines.insert(k, rng.choice([b"x", b" ", b"1 ", b"#"]) * (MAX_LINE_CHARS + rng.randint(1, 4096)))
    return b"\n".join(lines)


def repeat_symops(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """CIF: the symmetry loop's operations repeated, or the data block copied into extra blocks."""
    text = data.decode("utf-8", errors="replace")
    if rng.random() < 0.5:
        copies = rng.choice([2, 5, 9, 50])
        return "".join(text.replace("data_", f"data_copy{i}_", 1) for i in range(copies)).encode()
    return cif_with_repeated_ops(blocks=rng.choice([1, 2, 4]), sites=rng.choice([20, 150, 500]), ops=192).encode()


def count_mismatch(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """POSCAR: a count line that declares one atom fewer or more than the coordinate lines hold."""
    from matbalora.data.precheck import _coordinate_lines

    lines = data.decode("utf-8").split("\n")
    index = next(i for i in (5, 6) if i < len(lines) and lines[i].split() and all(t.isdigit() for t in lines[i].split()))
    counts = [int(tok) for tok in lines[index].split()]
    found = _coordinate_lines(lines, index)
    k = rng.randrange(len(counts))
    counts[k] = max(0, counts[k] + found - sum(counts) + (-1 if found > 0 and rng.random() < 0.5 else 1))
    if sum(counts) == found:
        counts[k] += 1
    lines[index] = " ".join(map(str, counts))
    return "\n".join(lines).encode()


MUTATIONS: dict[str, Callable[[random.Random, bytes, str], bytes]] = {
    f.__name__: f
    for f in (
        truncate,
        flip_bytes,
        splice,
        shuffle_lines,
        extreme_numbers,
        swap_element,
        encoding,
        declare_many,
        bad_cell,
        broken_syntax,
        long_line,
    )
}
#: Mutations of one format only, and those whose input must never be accepted when applied last.
FORMAT_MUTATIONS = {"json": (class_lookup,), "cif": (repeat_symops,), "poscar": (count_mismatch,), "extxyz": ()}
MUST_REJECT = {"json": {"class_lookup"}, "poscar": {"count_mismatch"}, "extxyz": {"long_line"}, "cif": set()}


@dataclass
class Case:
    """One fuzz input: the seed file and mutations that made ``data``; ``gz``: written gzipped."""

    fmt: str
    seed_name: str
    ops: list[str]
    data: bytes
    gz: bool = False
    must_reject: bool = False  # the last mutation applied must make some entry a rejection


def make_case(rng: random.Random, seeds: dict[str, list[tuple[str, bytes]]], fmt: str) -> Case:
    """Pick a seed of ``fmt`` and apply 0-3 mutations drawn from ``rng`` (a format's own mutations
    take one draw in eight)."""
    name, data = rng.choice(seeds[fmt])
    own = {f.__name__: f for f in FORMAT_MUTATIONS[fmt]}
    pool = {**MUTATIONS, **own}
    ops = [rng.choice(list(own)) if own and rng.random() < 0.125 else rng.choice(list(MUTATIONS))
           for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3]))]
    applied = False
    for op in ops:
        try:
            mutated = pool[op](rng, data, fmt)
        except Exception:  # the mutation needs structure an earlier one destroyed: keep the input as it is
            applied = False
            continue
        applied, data = mutated != data, mutated
    gz = rng.random() < 0.1
    return Case(fmt, name, ops, data, gz, must_reject=bool(ops) and ops[-1] in MUST_REJECT[fmt] and applied)


def judge(case: Case, outcomes: list[str]) -> list[str]:
    """``outcomes``, plus a failure when a case that must be refused had every entry accepted."""
    if case.must_reject and outcomes and all(o == "accepted" for o in outcomes):
        return [*outcomes, f"failure:hostile input accepted ({case.ops[-1]})"]
    return outcomes


# ---------------------------------------------------------------- fixed hostile inputs


def cif_with_repeated_ops(*, blocks: int, sites: int, ops: int) -> str:
    """``blocks`` P1 data blocks, each listing ``sites`` atoms and ``ops`` copies of the identity
    (the issue's 73 kB file: 4 blocks x 500 sites x 192 operations, 206 s of CPU before)."""
    rng = random.Random(18)
    ops_text = "'x,y,z'\n" * ops
    out = []
    for b in range(blocks):
        rows = "".join(f"O{i} O {rng.random():.4f} {rng.random():.4f} {rng.random():.4f} 1\n" for i in range(sites))
        out.append(f"data_b{b}\n_cell_length_a 30\n_cell_length_b 30\n_cell_length_c 30\n_cell_angle_alpha 90\n"
                   "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
                   f"_symmetry_equiv_pos_as_xyz\n{ops_text}loop_\n_atom_site_label\n_atom_site_type_symbol\n"
                   f"_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n{rows}")
    return "".join(out)


def _members(block: bytes, count: int) -> bytes:
    """``count`` gzip members of ``block``: ``count`` x len(block) bytes from a few kB of file."""
    return gzip.compress(block, compresslevel=9) * count


def hostile_files() -> dict[str, bytes]:
    """File name -> bytes of one input per hostile class of issue 18 (all refused, within bounds)."""
    salt = {"lattice": {"matrix": [[4, 0, 0], [0, 4, 0], [0, 0, 4]]},
            "sites": [{"species": [{"element": "Na", "occu": 1}], "abc": [0, 0, 0], "properties": {}},
                      {"species": [{"element": "Cl", "occu": 1}], "abc": [0.5, 0.5, 0.5], "properties": {}}]}  # fmt: skip
    lookup = json.loads(json.dumps(salt))
    lookup["sites"][1]["properties"]["payload"] = {"@module": "MODULE", "@class": "Evil"}
    tensor = json.loads(json.dumps(salt))  # before: a 3.5 GB tensor from a few hundred bytes
    tensor["sites"][0]["properties"]["t"] = {"@module": "torch", "@class": "Tensor", "dtype": "torch.float32",
                                             "data": {"@module": "numpy", "@class": "ones", "shape": [30000, 30000]}}
    mib = 1 << 20
    return {
        "json_class_lookup.json": json.dumps(lookup).encode(),
        "json_tensor.json": json.dumps(tensor).encode(),
        "long_line.extxyz.gz": gzip.compress(b"1\n") + _members(b"x" * mib, 64) + gzip.compress(b"\nNa 0 0 0\n"),
        "bomb.extxyz.gz": gzip.compress(b"1000000000\ncomment\n") + _members((b"H 0 0 0".ljust(1023) + b"\n") * 1024, 20),
        "whitespace.json.gz": _members(b" " * mib, 20),
        "repeated_ops.cif": cif_with_repeated_ops(blocks=4, sites=500, ops=192).encode(),
        "many_blocks.cif": cif_with_repeated_ops(blocks=2000, sites=1, ops=1).encode(),
        "count_mismatch.vasp": b"x\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1\nDirect\n0 0 0\n.5 .5 .5\n",
        # millions of 3-byte entries: before, 93 us and 600 B each (28 s, 175 MB per 300,000)
        "empty_frames.extxyz.gz": _members(b"0\n\n" * (mib // 3), 6),
        "zeros.json.gz": gzip.compress(b"[") + _members(b"0," * (mib // 2), 6) + gzip.compress(b"0]"),
    }


def hostile_paths(folder: Path) -> list[Path]:
    """Entries that are not regular files (a FIFO, a broken link, a link loop), alone and in a folder."""
    odd = folder / "odd_entries"
    odd.mkdir(exist_ok=True)
    (odd / "good.vasp").write_bytes(b"x\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\nDirect\n0 0 0\n.5 .5 .5\n")
    for name, make in (("pipe.cif", lambda p: os.mkfifo(p)), ("broken.cif", lambda p: p.symlink_to(odd / "gone")),
                       ("loop.cif", lambda p: p.symlink_to(p))):
        if not (odd / name).is_symlink() and not (odd / name).exists():
            make(odd / name)
    return [odd / "pipe.cif", odd / "broken.cif", odd / "loop.cif", odd / "missing.cif", odd]


# ---------------------------------------------------------------- running one case


@contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread once this process has used ``seconds`` of CPU time
    (ITIMER_PROF): a bound on the work a case does, which other jobs starving the machine cannot
    trip. A case blocked without using CPU is left to the wall-clock watchdogs (faulthandler)."""

    def _raise(signum, frame):
        raise CaseTimeout(f"no result within {seconds} s of CPU time")

    old = signal.signal(signal.SIGPROF, _raise)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


@contextmanager
def memory_limit(extra_bytes: int):
    """Cap this process's address space at its current size + ``extra_bytes`` (RLIMIT_AS), so a
    runaway allocation raises MemoryError instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    cap = pages * resource.getpagesize() + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def write_case(case: Case, folder: Path, index: int) -> Path:
    path = folder / f"case{index}{SUFFIX[case.fmt]}{'.gz' if case.gz else ''}"
    path.write_bytes(gzip.compress(case.data) if case.gz else case.data)
    return path


def time_bound(path: Path, seconds: float, per_mib: float = 2.0) -> float:
    """A case's time bound: ``seconds`` plus ``per_mib`` per MiB of input (reading is linear in
    the file: a 10 MB JSON of 80,000 sites takes seconds to decode on a busy machine)."""
    size = path.stat().st_size if path.is_file() else 0  # FIFOs, broken links, folders: no bytes of their own
    return seconds + per_mib * size / 2**20


def run_case(path: Path, *, predictor=None, seconds: float = 10.0) -> tuple[list[str], float]:
    """Outcome of every entry of one file: ``accepted`` (read, validated and, with a predictor,
    predicted to a finite band gap), a rejection reason, or ``failure:<what>`` (``failure:timeout``
    past ``time_bound(path, seconds)`` of CPU time); and the CPU seconds the case used."""
    from matbalora.data.dataset import Rejection
    from matbalora.data.readers import read_structures
    from matbalora.data.validation import REASONS

    start = time.process_time()
    outcomes: list[str] = []
    try:
        with time_limit(time_bound(path, seconds)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = read_structures(path)
            for _, obj in items:
                if isinstance(obj, Rejection):
                    outcomes.append(obj.reason if obj.reason in REASONS else f"failure:unnamed reason {obj.reason!r}")
            accepted = [obj for _, obj in items if not isinstance(obj, Rejection)]
            if accepted and predictor is not None:
                frame = predictor.predict(accepted, samples=2)
                for gap, error in zip(frame["band_gap"], frame["error"], strict=True):
                    if error:
                        outcomes.append(f"failure:predict row error {error.split(':')[0]}")
                    else:
                        outcomes.append("accepted" if np.isfinite(gap) else "failure:non-finite prediction")
            else:
                outcomes += ["accepted"] * len(accepted)
    except CaseTimeout:
        outcomes.append("failure:timeout")
    except Exception as exc:  # what the fuzzing looks for
        outcomes.append(f"failure:{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    return outcomes, time.process_time() - start


def tiny_predictor(folder: Path):
    """A Predictor on a tiny random CHGNet with BaLoRA adapters (as tests/conftest.py builds them)."""
    import torch

    from conftest import tiny_chgnet, tiny_model
    from matbalora.predict import Predictor

    ckpt = folder / "tiny_chgnet.pth.tar"
    torch.save({"model": tiny_chgnet().as_dict()}, ckpt)
    return Predictor(tiny_model("balora", ckpt))
