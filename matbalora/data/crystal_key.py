"""A key for a crystal that does not depend on how it was written down.

The key seeds a crystal's Monte-Carlo draws (``BandGapModel.sample_gaps(keys=...)``), so the same
crystal gets the same interval alone, in any batch, in any order, from a CIF, a POSCAR or an extxyz,
as a supercell, rotated, shifted or in another setting. It is the SHA-256 of what symmetry says about
the crystal, from spglib's symmetry search (tolerance :data:`SYMPREC`): the space-group number, the
orbits of its atoms (element and relative orbit size; not Wyckoff letters, which change with the
choice of origin, e.g. 4a/4b in rock salt), and the volume per atom on a 1 Å³ grid. Those
are discrete or coarse, so the rounding of one file format against another, the choice of cell or
origin and the site order do not change them; oxidation states and magnetic moments are left out
(the networks see elements only).

Two different but similar crystals (polymorphs with the same space group and Wyckoff sequence and
nearly the same density) can share a key; that only means they share random numbers, which is
harmless: the key is never used to look anything up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

#: tolerance of the symmetry search, Å (pymatgen's default)
SYMPREC = 0.01
#: volume per atom is hashed on this grid, Å³: a file's rounding (~1e-4 Å³ per atom) flips it rarely
VOLUME_GRID = 1.0


def _element(site) -> str:
    """The element of an ordered site (``Na`` for ``Na+``; a dummy species keeps its symbol)."""
    return getattr(site.specie, "symbol", str(site.specie))


def crystal_key(structure) -> str:
    """Hex SHA-256 key of ``structure`` (a pymatgen Structure), the same for every copy of it."""
    import spglib

    elements = [_element(site) for site in structure]
    names = sorted(set(elements))
    numbers = [names.index(e) + 1 for e in elements]
    orbits: list[list] | None = None
    number = None
    try:
        with warnings.catch_warnings():  # spglib 2.x warns about its old error handling on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            found = spglib.get_symmetry_dataset((structure.lattice.matrix, structure.frac_coords, numbers), symprec=SYMPREC)
    except Exception as exc:  # spglib raises on some degenerate cells instead of returning None
        log.debug("crystal key: spglib failed (%s)", exc)
        found = None
    if found is not None:
        number = int(found.number)
        first, size = np.unique(np.asarray(found.crystallographic_orbits), return_counts=True)  # orbits under the whole space group
        unit = int(np.gcd.reduce(size))  # a supercell multiplies every orbit's size
        orbits = sorted([elements[i], int(n) // unit] for i, n in zip(first, size))
    counts = {e: elements.count(e) for e in names}
    smallest = min(counts.values())
    formula = sorted((e, round(c / smallest, 3)) for e, c in counts.items())  # reduced, as ratios
    volume = int(np.rint(structure.volume / len(structure) / VOLUME_GRID))
    text = json.dumps({"formula": formula, "spacegroup": number, "orbits": orbits, "volume_per_atom": volume}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def draw_seed(key: str, seed: int, draw: int) -> int:
    """The 63-bit seed of draw ``draw`` of the crystal with ``key`` under the user's ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{draw}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
