"""Size checks on the raw text of CIF and POSCAR files, run before pymatgen builds a Structure.

pymatgen applies a CIF's symmetry operations site by site and compares every new position with the
earlier ones, and it builds every data block of a file, not only the first: a 3 kB CIF listing 100
general positions in F m -3 m takes about a minute to expand to 19,104 atoms (the time grows with
the square of the atom count). Its work grows with operations x listed sites x listed sites
(every listed site's images are compared with the earlier sites): 500 sites under 192 repeated
operations, which expand to only 500 atoms, took 40 s per block. A POSCAR count line can declare a
million atoms, or fewer atoms than coordinate lines follow (pymatgen then drops the extra lines and
predicts a different crystal). These checks estimate the atom count from the text (symmetry orbits
of the listed sites; declared counts), bound the work (``MAX_CIF_BLOCKS``, ``MAX_CIF_OP_SITES``),
match the counts with the coordinate lines, and refuse a file before any Structure exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from matbalora.data.validation import TOO_MANY_ATOMS, UNPARSABLE

if TYPE_CHECKING:
    from pymatgen.io.cif import CifParser

#: Characters read from a single-structure CIF/POSCAR file at most (larger files are refused).
MAX_TEXT_CHARS = 8 * 2**20  # a 500-atom CIF is about 50 kB; pymatgen parses about 1 MiB of odd tokens per 1.5 s
#: Symmetry operations one CIF block may list: the largest space-group order (F m -3 m, conventional).
MAX_SYMOPS = 192
#: Blocks of one CIF may expand to this many times ``max_atoms`` in total (pymatgen builds them all).
MAX_BLOCKS_FACTOR = 4
#: Data blocks one CIF may hold (pymatgen builds every one; the first is used).
MAX_CIF_BLOCKS = 8
#: Symmetry operations x listed sites, summed over a CIF's blocks: bounds pymatgen's expansion work
#: (about 1.5 s at this bound on one core). Real files stay far below: a 500-atom crystal listed
#: at general positions needs about 500, MOF-5 in F m -3 m (424 atoms, 6 sites) 1,152.
MAX_CIF_OP_SITES = 20_000
#: Fractional tolerance for telling orbit points apart; looser than pymatgen's 1e-4, so the
#: estimate errs towards fewer atoms (never refuses a structure pymatgen would build small).
ORBIT_TOL = 1e-3


def orbit_size(point: np.ndarray, rotations: np.ndarray, translations: np.ndarray) -> int:
    """Distinct images of one fractional ``point`` [3] under symmetry operations
    (``rotations`` [k, 3, 3], ``translations`` [k, 3]), modulo lattice translations."""
    images = (rotations @ point + translations) % 1.0  # [k, 3]
    diff = images[:, None, :] - images[None, :, :]
    diff -= np.round(diff)
    close = np.all(np.abs(diff) < ORBIT_TOL, axis=-1)
    return int(len(images) - np.any(np.tril(close, -1), axis=1).sum())


def _column(block, key: str) -> list:
    value = block.data.get(key)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


_SYMMETRY: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}


def _symmetry(parser: CifParser, block) -> tuple[np.ndarray, np.ndarray] | None:
    """The block's symmetry operations as (rotations [k, 3, 3], translations [k, 3]), or None when
    pymatgen cannot read them; cached by the block's symmetry entries, since pymatgen generates a
    named space group from scratch on every call (about 0.8 s for F m -3 m)."""
    key = repr(sorted((k, v) for k, v in block.data.items() if "symmetry" in k or "space_group" in k))
    if key not in _SYMMETRY:
        try:
            ops = parser.get_symops(block)
        except Exception:
            ops = []
        found = None
        if ops:
            found = (
                np.array([op.rotation_matrix for op in ops], dtype=np.float64),
                np.array([op.translation_vector for op in ops], dtype=np.float64),
            )
        if len(_SYMMETRY) >= 256:
            _SYMMETRY.clear()
        _SYMMETRY[key] = found
    return _SYMMETRY[key]


def _block_atoms(parser: CifParser, block, name: str, limit: int) -> int | tuple[str, str]:
    """Estimated atoms of one CIF block (stops counting above ``limit``), or ``(reason, detail)``."""
    from pymatgen.io.cif import str2float

    labels = _column(block, "_atom_site_label")
    if len(labels) > limit:
        return TOO_MANY_ATOMS, f"CIF block {name!r} lists {len(labels)} atoms > {limit} (not built)"
    symmetry = _symmetry(parser, block)
    if symmetry is None:  # pymatgen will fail on this block too, quickly
        return len(labels)
    rotations, translations = symmetry
    if len(rotations) > MAX_SYMOPS:
        return (
            UNPARSABLE,
            f"CIF block {name!r} lists {len(rotations)} symmetry operations; a space group has at most {MAX_SYMOPS}",
        )
    columns = [_column(block, f"_atom_site_fract_{axis}") for axis in "xyz"]
    total = 0
    for row in range(len(labels)):
        try:
            point = np.array([str2float(col[row]) for col in columns], dtype=np.float64)
        except Exception:  # missing or unreadable coordinate: pymatgen skips or fails on it
            point = None
        total += 1 if point is None or not np.all(np.isfinite(point)) else orbit_size(point, rotations, translations)
        if total > limit:
            break
    return total


def _work_problem(parser: CifParser, blocks: list) -> tuple[str, str] | None:
    """UNPARSABLE when the CIF's symmetry operations x listed sites, summed over its blocks, exceed
    MAX_CIF_OP_SITES (what pymatgen's expansion costs, even when few atoms come out of it)."""
    work = 0
    for name, block in blocks:
        listed = max((len(_column(block, key)) for key in block.data if "equiv_pos" in key or "symop" in key), default=0)
        if listed > MAX_SYMOPS:  # before pymatgen parses them (10^6 listed operations: 10 s)
            return UNPARSABLE, f"CIF block {name!r} lists {listed} symmetry operations; a space group has at most {MAX_SYMOPS}"
        symmetry = _symmetry(parser, block)
        work += (1 if symmetry is None else len(symmetry[0])) * len(_column(block, "_atom_site_label"))
        if work > MAX_CIF_OP_SITES:
            return UNPARSABLE, (
                f"CIF block {name!r}: symmetry operations x listed sites reach {work} > {MAX_CIF_OP_SITES} "
                "(too much work to expand; are operations repeated?)"
            )
    return None


def cif_problem(parser: CifParser, *, max_atoms: int) -> tuple[str, str] | None:
    """``(reason, detail)`` when building the CIF's structures would exceed the atom or work limits."""
    blocks = list(parser._cif.data.items())  # the sanitised blocks parse_structures will build
    if len(blocks) > MAX_CIF_BLOCKS:
        return UNPARSABLE, (
            f"CIF has {len(blocks)} data blocks > {MAX_CIF_BLOCKS}; every block is built, so keep one structure per file"
        )
    work = _work_problem(parser, blocks)  # before the orbits: counting them costs ops^2 per site
    if work is not None:
        return work
    total = 0
    for index, (name, block) in enumerate(blocks):
        budget = MAX_BLOCKS_FACTOR * max_atoms - total
        found = _block_atoms(parser, block, name, max_atoms if index == 0 else budget)
        if isinstance(found, tuple):
            return found
        if index == 0 and found > max_atoms:
            return TOO_MANY_ATOMS, f"CIF expands to more than max_atoms={max_atoms} atoms (not built)"
        total += found
        if total > MAX_BLOCKS_FACTOR * max_atoms:
            return TOO_MANY_ATOMS, (
                f"CIF has {len(blocks)} data blocks expanding to more than {MAX_BLOCKS_FACTOR * max_atoms} atoms "
                "in total; every block is built, so keep one structure per file"
            )
    return None


def _coordinate_lines(lines: list[str], count_index: int) -> int:
    """Lines after the coordinate-mode line (and an optional selective-dynamics line) up to the
    first blank line: the block pymatgen reads positions from (velocities follow a blank line)."""
    mode = count_index + 1
    if mode < len(lines) and lines[mode].strip()[:1].lower() == "s":
        mode += 1
    body = lines[mode + 1 :]
    return next((i for i, line in enumerate(body) if not line.strip()), len(body))


def poscar_problem(text: str, *, max_atoms: int) -> tuple[str, str] | None:
    """TOO_MANY_ATOMS when the POSCAR's count line (line 6, or 7 after a species line) declares
    more than ``max_atoms`` atoms; UNPARSABLE when it declares another number of atoms than
    coordinate lines follow (pymatgen would read the first ones and drop the rest)."""
    lines = text.splitlines()
    for index in (5, 6):
        tokens = lines[index].split() if index < len(lines) else []
        try:
            counts = [int(tok) for tok in tokens]
        except ValueError:
            continue
        if counts:
            declared = sum(counts)
            if declared > max_atoms:
                return TOO_MANY_ATOMS, f"POSCAR declares {declared} atoms > max_atoms={max_atoms} (not parsed)"
            found = _coordinate_lines(lines, index)
            if found != declared:
                return UNPARSABLE, (
                    f"POSCAR count line {' '.join(tokens)[:60]!r} declares {declared} atoms, but {found} coordinate lines follow"
                )
            return None
    return None
