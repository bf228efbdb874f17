"""Structure and target checks with named rejection reasons, and the on-invalid policy.

Cheap checks (size, finiteness, order, lattice, density) run before the one neighbour search, so a
structure declaring a million atoms is rejected without touching its sites. The neighbour search
itself (pymatgen's ``find_points_in_spheres``, which the backbones' graph converters also run) allocates
one entry per periodic image it visits and one grid cell per ``radius`` cube of the sites' extent:
``check_search_size`` bounds both before it runs, and the neighbour counts it finds bound the graph
(edges and angles) before any graph is built.

What a backbone's converter needs (cutoffs, elements) is a :class:`GraphLimits` that each backbone
declares (``Backbone.limits``); the defaults here are those of the default backbone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from matbalora.data.dataset import Rejection

if TYPE_CHECKING:
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

# Reader side
UNREADABLE = "unreadable"  # not a regular file: missing, a broken link or loop, a FIFO, a device
UNPARSABLE = "unparsable"
MISSING_STRUCTURE = "missing_structure"  # a target row whose structure file is absent
DUPLICATE_ID = "duplicate_id"
# Structure
EMPTY = "empty"
TOO_MANY_ATOMS = "too_many_atoms"
NON_FINITE = "non_finite"
DISORDERED = "disordered"
UNSUPPORTED_ELEMENT = "unsupported_element"
BAD_LATTICE = "bad_lattice"
OVERLAPPING_ATOMS = "overlapping_atoms"
ISOLATED_ATOM = "isolated_atom"
TOO_DENSE = "too_dense"
TOO_SPREAD = "too_spread"
# Target
MISSING_TARGET = "missing_target"
NON_FINITE_TARGET = "non_finite_target"
NEGATIVE_TARGET = "negative_target"

REASONS: tuple[str, ...] = (
    UNREADABLE,
    UNPARSABLE,
    MISSING_STRUCTURE,
    DUPLICATE_ID,
    EMPTY,
    TOO_MANY_ATOMS,
    NON_FINITE,
    DISORDERED,
    UNSUPPORTED_ELEMENT,
    BAD_LATTICE,
    OVERLAPPING_ATOMS,
    ISOLATED_ATOM,
    TOO_DENSE,
    TOO_SPREAD,
    MISSING_TARGET,
    NON_FINITE_TARGET,
    NEGATIVE_TARGET,
)

OnInvalid = Literal["error", "skip", "warn"]
ON_INVALID: tuple[str, ...] = get_args(OnInvalid)

DEFAULT_MAX_ATOMS = 500
DEFAULT_MIN_DISTANCE = 0.5  # Å


@dataclass(frozen=True)
class GraphLimits:
    """What a backbone's graph converter needs of a structure.

    ``cutoff`` Å: the neighbour radius (an atom without a neighbour within it is isolated);
    ``bond_cutoff`` Å: the radius of the bonds that angles join (None: the backbone builds no angles);
    ``max_atomic_number``: the heaviest element embedded; ``elements``: the atomic numbers embedded
    when they are not all of 1..max_atomic_number.
    """

    cutoff: float
    bond_cutoff: float | None
    max_atomic_number: int
    elements: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not self.cutoff >= 0 or (self.bond_cutoff is not None and not self.bond_cutoff >= 0):
            raise ValueError(f"cutoff={self.cutoff!r}, bond_cutoff={self.bond_cutoff!r}; must be >= 0 Å")
        if not isinstance(self.max_atomic_number, int) or self.max_atomic_number < 1:
            raise ValueError(f"max_atomic_number={self.max_atomic_number!r}; must be a positive integer")


#: The default backbone's limits (6 Å atom graph, 3 Å bond graph, elements H (1) to Pu (94));
#: ``tests/test_backbones.py`` checks that they are what that backbone declares.
DEFAULT_LIMITS = GraphLimits(cutoff=6.0, bond_cutoff=3.0, max_atomic_number=94)
DEFAULT_CUTOFF = DEFAULT_LIMITS.cutoff  # Å
MAX_ATOMIC_NUMBER = DEFAULT_LIMITS.max_atomic_number
#: A cell is degenerate when det(L) <= this fraction of |a||b||c| (flat or collinear vectors).
MIN_RELATIVE_VOLUME = 1e-6
#: Most atoms per Å^3: 2.6x the densest crystal in Materials Project (0.19 in mp_gap). Locally,
#: within a sphere of radius r around any atom, at most MAX_DENSITY * 4/3 pi r^3 + LOCAL_SLACK
#: neighbours (mp_gap at most: 176 within 6 Å, 32 within 3 Å; these limits: 476 and 80).
MAX_DENSITY = 0.5
LOCAL_SLACK = 24
BOND_CUTOFF = DEFAULT_LIMITS.bond_cutoff  # Å: angles join bonds shorter than this
#: Most periodic site images, and most grid cells, one neighbour search may visit (about 56 bytes
#: per image, 280 per cell; a 500-atom crystal needs some 10^4 of each).
MAX_SEARCH_IMAGES = 4_000_000
MAX_SEARCH_CELLS = 500_000
#: Sites further than this many cells from the unit cell are refused: pymatgen's search counts
#: image cells in 32-bit integers (hangs from about 2e9) and positions lose precision long before.
MAX_CELLS_AWAY = 1_000_000


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
    with np.errstate(all="ignore"):  # an overflowing volume is inf, refused below
        volume = float(np.linalg.det(lattice))
        scale = float(np.prod(np.linalg.norm(lattice, axis=1)))
    if not volume > MIN_RELATIVE_VOLUME * scale:  # also catches volume <= 0 and NaN
        return BAD_LATTICE, f"cell volume {volume:.4g} Å^3 (zero, negative or degenerate)"
    if not n_atoms / volume <= MAX_DENSITY:
        return TOO_DENSE, f"{n_atoms / volume:.3g} atoms/Å^3 > {MAX_DENSITY} (real crystals: at most about 0.2)"
    return None


def check_search_size(lattice: Any, cart_coords: Any, radius: float) -> tuple[str, str] | None:
    """Refuse a periodic neighbour search within ``radius`` Å that would allocate without bound.

    ``lattice``: [3, 3] Å, rows are vectors, finite with positive volume (``check_cheap``);
    ``cart_coords``: [n_atoms, 3] Å. Mirrors the bounds of pymatgen's ``find_points_in_spheres``:
    it visits every image within ``radius`` of the cell heights around the sites' fractional
    extent, and bins the sites' Cartesian extent into cubes of ``radius``.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    cart = np.asarray(cart_coords, dtype=np.float64).reshape(-1, 3)
    r = max(float(radius), 1.0)  # pymatgen searches at least 1 Å
    with np.errstate(all="ignore"):  # overflow becomes inf and fails the <= tests below
        scale = float(np.abs(lattice).max())  # heights of the unit-scaled cell: no overflow in between
        unit = lattice / scale
        areas = np.linalg.norm(np.cross(unit[[1, 2, 0]], unit[[2, 0, 1]]), axis=1)
        heights = scale * abs(float(np.linalg.det(unit))) / areas  # [3] Å, distance between lattice planes
        reps = np.ceil((r + 0.15) / heights)
        frac = np.linalg.solve(lattice.T, cart.T).T
        spans = np.ceil(frac.max(0) + reps) - np.floor(frac.min(0) - reps)  # [3] cells visited
        images = len(cart) * float(np.prod(spans))
        cells = float(np.prod(np.ceil((np.ptp(cart, axis=0) + 2 * r) / r)))
        away = np.abs(frac).max(axis=1)  # [n_atoms]
    if not away.max() <= MAX_CELLS_AWAY:
        site = int(np.argmax(np.nan_to_num(away, nan=np.inf)))
        return TOO_SPREAD, (
            f"site {site} lies {away[site]:.3g} cells from the unit cell (> {MAX_CELLS_AWAY}); wrap the coordinates"
        )
    if not images <= MAX_SEARCH_IMAGES:
        if not len(cart) * float(np.prod(2 * reps + 2)) <= MAX_SEARCH_IMAGES:
            return BAD_LATTICE, (
                f"cell heights {np.round(heights, 4).tolist()} Å are too thin for a {radius} Å neighbour search "
                f"({images:.3g} periodic images > {MAX_SEARCH_IMAGES}); reduce the cell (Niggli) first"
            )
        return TOO_SPREAD, (
            f"sites span {np.round(np.ptp(frac, axis=0), 1).tolist()} cells ({images:.3g} periodic images to search "
            f"> {MAX_SEARCH_IMAGES}); wrap the coordinates into the cell"
        )
    if not cells <= MAX_SEARCH_CELLS:
        return TOO_SPREAD, (
            f"sites spread over {np.round(np.ptp(cart, axis=0), 1).tolist()} Å ({cells:.3g} search cells of {r} Å "
            f"> {MAX_SEARCH_CELLS})"
        )
    return None


def _unsupported_element(structure: Structure, limits: GraphLimits) -> tuple[str, str] | None:
    """UNSUPPORTED_ELEMENT for a dummy species or an element the backbone has no embedding for
    (an embedding lookup out of range takes the whole batch down with it)."""
    from pymatgen.core import DummySpecies

    numbers = np.array([0 if isinstance(site.specie, DummySpecies) else site.specie.Z for site in structure])
    known = (numbers >= 1) & (numbers <= limits.max_atomic_number)
    if limits.elements is not None:
        known &= np.isin(numbers, sorted(limits.elements))
    outside = np.flatnonzero(~known)
    if not outside.size:
        return None
    bad = int(outside[0])
    what = f"Z={int(numbers[bad])}" if numbers[bad] else "not a chemical element"
    knows = f"Z=1..{limits.max_atomic_number}" if limits.elements is None else f"{len(limits.elements)} elements up to Z={limits.max_atomic_number}"
    return UNSUPPORTED_ELEMENT, f"site {bad} is {structure[bad].specie} ({what}); the model knows elements {knows} ({outside.size} such sites)"


def _crowded_site(centers: np.ndarray, distances: np.ndarray, n_atoms: int, cutoff: float, bond_cutoff: float | None) -> tuple[str, str] | None:
    """TOO_DENSE when an atom has more neighbours within ``bond_cutoff`` or ``cutoff`` Å than any
    real crystal (bounds the graph's edges and angles)."""
    for r in sorted({min(cutoff, cutoff if bond_cutoff is None else bond_cutoff), cutoff}):
        counts = np.bincount(centers[distances <= r], minlength=n_atoms)
        limit = MAX_DENSITY * 4 / 3 * math.pi * r**3 + LOCAL_SLACK
        if counts.size and counts.max() > limit:
            site = int(np.argmax(counts))
            return TOO_DENSE, f"site {site} has {int(counts[site])} neighbours within {r} Å (> {limit:.0f})"
    return None


def site_name(structure: Structure, index: int) -> str:
    """The site's CIF label (``Fe1``) when it has one, else ``#index``."""
    site = structure[index]
    label = getattr(site, "label", None)
    return label if label and label != site.species_string else f"#{index}"


def check_structure(
    structure: Structure,
    *,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    cutoff: float | None = None,
    limits: GraphLimits = DEFAULT_LIMITS,
) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first failed check, or None when the structure is usable.

    ``limits``: the backbone's (``Backbone.limits``); ``cutoff`` Å, when given, replaces its neighbour radius.
    """
    cutoff = limits.cutoff if cutoff is None else cutoff
    n_atoms = len(structure)  # first: never touch the sites of an oversized structure
    if n_atoms == 0 or n_atoms > max_atoms:
        return check_cheap(n_atoms, None, None, max_atoms=max_atoms)
    cheap = check_cheap(n_atoms, structure.lattice.matrix, structure.frac_coords, max_atoms=max_atoms)
    if cheap is not None:
        return cheap
    if not structure.is_ordered:
        bad = next(i for i, site in enumerate(structure) if not site.is_ordered)
        return DISORDERED, (
            f"site {site_name(structure, bad)} has partial occupancy {structure[bad].species}; supply an ordered "
            "supercell, or predict an ordered approximant with --order (order=True: pymatgen's OrderDisorderedStructureTransformation)"
        )
    unsupported = _unsupported_element(structure, limits)
    if unsupported is not None:
        return unsupported
    radius = max(cutoff, min_distance)
    too_large = check_search_size(structure.lattice.matrix, structure.cart_coords, radius)
    if too_large is not None:
        return too_large
    centers, neighbors, distances = _neighbor_pairs(structure, radius)
    if len(distances):
        closest = int(np.argmin(distances))
        if distances[closest] < min_distance:
            return OVERLAPPING_ATOMS, (
                f"sites {centers[closest]} and {neighbors[closest]} are {distances[closest]:.3f} Å apart "
                f"(< {min_distance} Å)"
            )
    if cutoff > 0:
        crowded = _crowded_site(centers, distances, n_atoms, cutoff, limits.bond_cutoff)
        if crowded is not None:
            return crowded
        isolated = np.setdiff1d(np.arange(n_atoms), centers[distances <= cutoff])
        if isolated.size:
            return ISOLATED_ATOM, f"site {int(isolated[0])} has no neighbour within {cutoff} Å ({isolated.size} such)"
    return None


def _neighbor_pairs(structure: Structure, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (center, neighbour, distance Å) pairs within ``radius``, periodic images included,
    an atom's own zero-offset self excluded (the search the graph converters run)."""
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
