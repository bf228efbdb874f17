"""Structure and target checks with named rejection reasons, and the on-invalid policy.

Cheap checks (size, finiteness, order, lattice) run before the one neighbour search, so a
structure declaring a million atoms is rejected without touching its sites.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from matbalora.data.dataset import Rejection

if TYPE_CHECKING:
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

# Reader side
UNPARSABLE = "unparsable"
MISSING_STRUCTURE = "missing_structure"  # a target row whose structure file is absent
DUPLICATE_ID = "duplicate_id"
# Structure
EMPTY = "empty"
TOO_MANY_ATOMS = "too_many_atoms"
NON_FINITE = "non_finite"
DISORDERED = "disordered"
BAD_LATTICE = "bad_lattice"
OVERLAPPING_ATOMS = "overlapping_atoms"
ISOLATED_ATOM = "isolated_atom"
# Target
MISSING_TARGET = "missing_target"
NON_FINITE_TARGET = "non_finite_target"
NEGATIVE_TARGET = "negative_target"

REASONS: tuple[str, ...] = (
    UNPARSABLE,
    MISSING_STRUCTURE,
    DUPLICATE_ID,
    EMPTY,
    TOO_MANY_ATOMS,
    NON_FINITE,
    DISORDERED,
    BAD_LATTICE,
    OVERLAPPING_ATOMS,
    ISOLATED_ATOM,
    MISSING_TARGET,
    NON_FINITE_TARGET,
    NEGATIVE_TARGET,
)

OnInvalid = Literal["error", "skip", "warn"]
ON_INVALID: tuple[str, ...] = get_args(OnInvalid)

DEFAULT_MAX_ATOMS = 500
DEFAULT_MIN_DISTANCE = 0.5  # Å
DEFAULT_CUTOFF = 6.0  # Å, CHGNet 0.3.0 atom_graph_cutoff
#: A cell is degenerate when det(L) <= this fraction of |a||b||c| (flat or collinear vectors).
MIN_RELATIVE_VOLUME = 1e-6


def check_policy(on_invalid: str) -> None:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid={on_invalid!r}; allowed: {list(ON_INVALID)}")


def check_cheap(n_atoms: int, lattice: Any, coords: Any, *, max_atoms: int) -> tuple[str, str] | None:
    """Size and finiteness checks that need no neighbour search.

    ``lattice``: [3, 3] Å (rows are vectors) or None when there is no periodic cell;
    ``coords``: [n_atoms, 3] (any frame).
    """
    if n_atoms == 0:
        return EMPTY, "no atoms"
    if n_atoms > max_atoms:
        return TOO_MANY_ATOMS, f"{n_atoms} atoms > max_atoms={max_atoms}"
    if lattice is None:
        return BAD_LATTICE, "no periodic cell"
    lattice = np.asarray(lattice, dtype=np.float64)
    if lattice.shape != (3, 3):
        return BAD_LATTICE, f"lattice has shape {lattice.shape}, expected (3, 3)"
    if not np.all(np.isfinite(lattice)):
        return NON_FINITE, "lattice has NaN or inf entries"
    if not np.all(np.isfinite(np.asarray(coords, dtype=np.float64))):
        return NON_FINITE, "coordinates have NaN or inf entries"
    volume = float(np.linalg.det(lattice))
    scale = float(np.prod(np.linalg.norm(lattice, axis=1)))
    if not volume > MIN_RELATIVE_VOLUME * scale:  # also catches volume <= 0 and NaN
        return BAD_LATTICE, f"cell volume {volume:.4g} Å^3 (zero, negative or degenerate)"
    return None


def check_structure(
    structure: Structure,
    *,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float = DEFAULT_CUTOFF,
) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first failed check, or None when the structure is usable."""
    n_atoms = len(structure)  # first: never touch the sites of an oversized structure
    if n_atoms == 0 or n_atoms > max_atoms:
        return check_cheap(n_atoms, None, None, max_atoms=max_atoms)
    cheap = check_cheap(n_atoms, structure.lattice.matrix, structure.frac_coords, max_atoms=max_atoms)
    if cheap is not None:
        return cheap
    if not structure.is_ordered:
        bad = next(i for i, site in enumerate(structure) if not site.is_ordered)
        return DISORDERED, f"site {bad} has partial occupancy {structure[bad].species}"
    centers, neighbors, distances = _neighbor_pairs(structure, max(cutoff, min_distance))
    if len(distances):
        closest = int(np.argmin(distances))
        if distances[closest] < min_distance:
            return OVERLAPPING_ATOMS, (
                f"sites {centers[closest]} and {neighbors[closest]} are {distances[closest]:.3f} Å apart "
                f"(< {min_distance} Å)"
            )
    if cutoff > 0:
        isolated = np.setdiff1d(np.arange(n_atoms), centers[distances <= cutoff])
        if isolated.size:
            return ISOLATED_ATOM, f"site {int(isolated[0])} has no neighbour within {cutoff} Å ({isolated.size} such)"
    return None


def _neighbor_pairs(structure: Structure, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (center, neighbour, distance Å) pairs within ``radius``, periodic images included,
    an atom's own zero-offset self excluded (the search CHGNet's graph converter runs)."""
    try:
        from pymatgen.optimization.neighbors import find_points_in_spheres
    except ImportError:  # pure-python fallback of pymatgen
        centers, neighbors, _, distances = structure.get_neighbor_list(r=radius, numerical_tol=1e-8)
        return centers, neighbors, distances
    cart = np.ascontiguousarray(structure.cart_coords, dtype=float)
    centers, neighbors, _, distances = find_points_in_spheres(
        cart,
        cart,
        r=radius,
        pbc=np.ascontiguousarray(structure.lattice.pbc, dtype=np.int64),
        lattice=np.ascontiguousarray(structure.lattice.matrix, dtype=float),
        tol=1e-8,
    )
    keep = ~((centers == neighbors) & (distances <= 1e-8))
    return centers[keep], neighbors[keep], distances[keep]


def validate_structure(
    structure: Structure,
    *,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float = DEFAULT_CUTOFF,
) -> str | None:
    """The reason (a constant of this module) the structure is unusable, or None."""
    found = check_structure(structure, max_atoms=max_atoms, min_distance=min_distance, cutoff=cutoff)
    return None if found is None else found[0]


def parse_target(value: Any) -> float:
    """A band gap value as float (NaN when absent); raises ValueError when not a number."""
    if value is None:
        return math.nan
    if isinstance(value, str | bytes) or isinstance(value, bool | np.bool_):
        raise ValueError(f"band gap {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"band gap {value!r} is not a number") from exc


def check_target(value: float, *, required: bool) -> tuple[str, str] | None:
    """Reason for an unusable band gap (eV): missing (NaN, when required), inf, or negative."""
    if math.isnan(value):
        return (MISSING_TARGET, "no band gap") if required else None
    if not math.isfinite(value):
        return NON_FINITE_TARGET, f"band gap {value}"
    if value < 0:
        return NEGATIVE_TARGET, f"band gap {value} eV < 0"
    return None


def reject(entry: str, reason: str, detail: str, *, on_invalid: str, rejected: list[Rejection]) -> None:
    """Apply the policy: raise ValueError (error), or record (skip), or record and log (warn)."""
    if reason not in REASONS:
        raise ValueError(f"unknown rejection reason {reason!r}; allowed: {list(REASONS)}")
    if on_invalid == "error":
        raise ValueError(f"invalid entry {entry!r}: {reason} ({detail})")
    rejected.append(Rejection(entry, reason, detail))
    if on_invalid == "warn":
        log.warning("skipping %s: %s (%s)", entry, reason, detail)
