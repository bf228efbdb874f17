"""A key for a crystal that does not depend on how it was written down.

The key seeds a crystal's Monte-Carlo draws (``BandGapModel.sample_gaps(keys=...)``), so the same
crystal gets the same interval alone, in any batch, in any order, from a CIF, a POSCAR or an extxyz,
as a supercell, rotated or shifted. It is the SHA-256 of spglib's standardised primitive cell
(``spglib.standardize_cell(to_primitive=True)``: supercells, rotations, origin
shifts and site order are gone; the origin is put on an atom), with lattice parameters and fractional coordinates rounded coarsely
enough that the rounding of one file format against another does not change it.

Two different but nearly identical crystals can share a key; that only means they share random
numbers, which is harmless: the key is never used to look anything up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

#: tolerance of the symmetry search, Å (pymatgen's default 0.01)
SYMPREC = 0.01
#: rounding grids: 0.05 Å, 0.5°, 1/48 of a cell edge. Special positions (k/2, k/3, k/4, k/6, k/8, k/12,
#: k/16, k/24) and the usual angles (60°, 90°, 120°) sit at grid points, not at the edges between them,
#: so the last digit a file format keeps cannot flip them into the next cell of the grid
LENGTH_GRID, ANGLE_GRID, FRAC_GRID = 0.05, 0.5, 1 / 48


def _on_grid(values: np.ndarray, grid: float) -> list[int]:
    return [int(v) for v in np.rint(np.asarray(values, float) / grid)]


def _standard_cell(structure) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """spglib's standardised primitive cell: lattice [3, 3] Å, fractional coordinates [n, 3], species;
    the Niggli-reduced primitive cell when spglib finds no cell (e.g. degenerate inputs)."""
    import spglib

    names = sorted({site.species_string for site in structure})
    numbers = [names.index(site.species_string) + 1 for site in structure]
    try:
        with warnings.catch_warnings():  # spglib 2.x warns about its old error handling on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            found = spglib.standardize_cell((structure.lattice.matrix, structure.frac_coords, numbers), to_primitive=True, symprec=SYMPREC)
    except Exception as exc:  # spglib raises on some degenerate cells instead of returning None
        log.debug("crystal key: spglib failed (%s)", exc)
        found = None
    if found is None:
        try:
            cell = structure.get_primitive_structure(tolerance=SYMPREC).get_reduced_structure()
        except Exception:  # the cell as given: still order- and batch-independent
            cell = structure
        return cell.lattice.matrix, cell.frac_coords, [site.species_string for site in cell]
    lattice, frac, kinds = found
    return np.asarray(lattice), np.asarray(frac), [names[k - 1] for k in kinds]


def _canonical_sites(frac: np.ndarray, species: list[str]) -> list[tuple]:
    """Sites on the grid with the origin on one atom of the rarest species, the shift that gives the
    smallest sorted list (spglib's standard cell still leaves a choice of origin)."""
    cells = round(1 / FRAC_GRID)
    counts = {sp: species.count(sp) for sp in species}
    rarest = min(counts, key=lambda sp: (counts[sp], sp))
    best = None
    for origin in frac[[i for i, sp in enumerate(species) if sp == rarest]]:
        grid = np.rint(((frac - origin) % 1.0) / FRAC_GRID).astype(int) % cells
        sites = sorted((sp, *map(int, g)) for sp, g in zip(species, grid))
        best = sites if best is None or sites < best else best
    return best or []


def crystal_key(structure) -> str:
    """Hex SHA-256 key of ``structure`` (a pymatgen Structure), the same for every copy of it."""
    from pymatgen.core import Lattice

    matrix, frac, species = _standard_cell(structure)
    lattice = Lattice(matrix)
    text = json.dumps({"abc": _on_grid(lattice.abc, LENGTH_GRID), "angles": _on_grid(lattice.angles, ANGLE_GRID), "sites": _canonical_sites(frac, species)},
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def draw_seed(key: str, seed: int, draw: int) -> int:
    """The 63-bit seed of draw ``draw`` of the crystal with ``key`` under the user's ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{draw}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
