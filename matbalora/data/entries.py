"""Raw input entries and the one place where they are validated into a BandGapDataset."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matbalora.data.dataset import BandGapDataset, Rejection
from matbalora.data.validation import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_ATOMS,
    DEFAULT_MIN_DISTANCE,
    DUPLICATE_ID,
    NON_FINITE_TARGET,
    UNPARSABLE,
    GraphLimits,
    check_policy,
    check_structure,
    check_target,
    parse_target,
    reject,
)

if TYPE_CHECKING:
    from pymatgen.core import Structure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One input record as read: ``structure`` is None when reading failed (see ``failure``,
    a ``(reason, detail)`` pair); ``target`` is the raw band-gap value (eV) or None if absent;
    ``source``: ``path`` or ``path#position`` of the record ("" when unknown)."""

    id: str
    structure: Structure | None
    target: Any = None
    failure: tuple[str, str] | None = None
    source: str = ""


@dataclass(frozen=True)
class Checks:
    """Validation settings shared by every reader."""

    max_atoms: int = DEFAULT_MAX_ATOMS
    min_distance: float = DEFAULT_MIN_DISTANCE  # Å
    cutoff: float | None = None  # Å; None: the neighbour radius of ``limits``
    limits: GraphLimits = DEFAULT_LIMITS  # the backbone's cutoffs and elements

    def __post_init__(self) -> None:
        if not isinstance(self.max_atoms, int) or self.max_atoms < 1:
            raise ValueError(f"max_atoms={self.max_atoms!r}; must be a positive integer")
        if not self.min_distance >= 0:
            raise ValueError(f"min_distance={self.min_distance!r}; must be >= 0 Å")
        if self.cutoff is not None and not self.cutoff >= 0:
            raise ValueError(f"cutoff={self.cutoff!r}; must be >= 0 Å")

    def structure_problem(self, entry: Entry) -> tuple[str, str] | None:
        if entry.failure is not None:
            return entry.failure
        if entry.structure is None:
            return UNPARSABLE, "no structure"
        return check_structure(
            entry.structure, max_atoms=self.max_atoms, min_distance=self.min_distance, cutoff=self.cutoff, limits=self.limits
        )


def build_dataset(
    entries: Iterable[Entry],
    *,
    provenance: dict[str, Any],
    on_invalid: str = "skip",
    require_target: bool = True,
    checks: Checks | None = None,
) -> BandGapDataset:
    """Validate ``entries`` in order and collect the admitted ones; every other entry becomes a
    Rejection (``on_invalid='error'`` raises ValueError on the first one instead)."""
    check_policy(on_invalid)
    checks = checks or Checks()
    structures, targets, ids, rejected = [], [], [], []
    seen: set[str] = set()
    n_read = 0
    for entry in entries:
        n_read += 1
        if entry.id in seen:
            reject(entry.id, DUPLICATE_ID, "id used by an earlier entry", on_invalid=on_invalid, rejected=rejected)
            continue
        seen.add(entry.id)
        problem = entry.failure
        if problem is None:
            try:
                target = parse_target(entry.target)
            except ValueError as exc:
                problem = (NON_FINITE_TARGET, str(exc))
            else:
                problem = check_target(target, required=require_target)
        problem = problem or checks.structure_problem(entry)
        if problem is not None:
            reject(entry.id, *problem, on_invalid=on_invalid, rejected=rejected)
            continue
        structures.append(entry.structure)
        targets.append(target)
        ids.append(entry.id)
    counts = dict(Counter(r.reason for r in rejected).most_common())
    provenance = {
        **provenance,
        "max_atoms": checks.max_atoms,
        "min_distance": checks.min_distance,
        "cutoff": checks.cutoff,
        "require_target": require_target,
        "n_read": n_read,
        "n_admitted": len(ids),
        "n_rejected": len(rejected),
        "rejections": counts,
    }
    if rejected:
        log.info("%s: admitted %d of %d entries; rejected %s", provenance.get("source"), len(ids), n_read, counts)
    return BandGapDataset(structures, targets, ids, provenance, rejected)


def admit_structures(entries: Iterable[Entry], *, checks: Checks | None = None) -> list[tuple[str, Any]]:
    """Prediction inputs: ``(id, Structure | Rejection)`` per entry, in order (targets ignored)."""
    checks = checks or Checks()
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            out.append((entry.id, Rejection(entry.id, DUPLICATE_ID, "id used by an earlier entry", entry.source)))
            continue
        seen.add(entry.id)
        problem = checks.structure_problem(entry)
        out.append((entry.id, entry.structure if problem is None else Rejection(entry.id, *problem, entry.source)))
    return out
