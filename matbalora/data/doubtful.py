"""Disordered and doubtful inputs: ordered approximants, and what the parser warned about.

A disordered structure (partial occupancies, vacancies) cannot be a graph. With ``order=True``
(``--order``) it is replaced by an ordered approximant: the smallest supercell (at most
``MAX_CELLS`` cells, ``MAX_ORDER_ATOMS`` atoms) in which every occupancy is a whole number of atoms,
ordered by pymatgen's ``OrderDisorderedStructureTransformation`` (lowest Ewald energy, with
guessed oxidation states where they can be guessed). What was done is written to the structure's
``properties[NOTE]``; pymatgen's CIF warnings go to ``properties[WARNING]``. Both become the
``note`` and ``warning`` columns of ``screen`` and ``matbalora predict``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from matbalora.data.dataset import Rejection
from matbalora.data.entries import Entry
from matbalora.data.validation import DISORDERED, site_name

if TYPE_CHECKING:
    from pymatgen.core import Structure

NOTE = "note"
WARNING = "warning"
MAX_CELLS = 8
MAX_ORDER_ATOMS = 64  # atoms of the approximant: bounds the ordering search
_OCC_TOL = 0.02  # how far n * occupancy may be from a whole number
_MAX_GUESS_ELEMENTS = 4  # oxidation states are guessed only for small compositions (the guess is combinatorial)


def _cells_needed(structure: Structure) -> int | None:
    """Smallest n <= MAX_CELLS with n * occupancy (and n * vacancy) whole on every site."""
    for n in range(1, MAX_CELLS + 1):
        ok = True
        for site in structure:
            amounts = [*site.species.values(), 1.0 - sum(site.species.values())]
            if any(abs(n * a - round(n * a)) > _OCC_TOL for a in amounts):
                ok = False
                break
        if ok:
            return n
    return None


def _scaling(structure: Structure, n: int) -> list[int]:
    """A diagonal supercell of n cells, each prime factor stretching the shortest axis."""
    scale, lengths = [1, 1, 1], list(structure.lattice.abc)
    factor, rest = 2, n
    while rest > 1:
        while rest % factor == 0:
            axis = min(range(3), key=lambda i: lengths[i] * scale[i])
            scale[axis] *= factor
            rest //= factor
        factor += 1
    return scale


def ordered_approximant(structure: Structure, *, max_atoms: int) -> Structure:
    """An ordered stand-in for a disordered ``structure`` (NOTE in its properties); ValueError when
    none fits the bounds."""
    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation

    bad = [i for i, site in enumerate(structure) if not site.is_ordered]
    where = ", ".join(f"{site_name(structure, i)} ({structure[i].species})" for i in bad[:3])
    n = _cells_needed(structure)
    limit = min(max_atoms, MAX_ORDER_ATOMS)
    if n is None or n * len(structure) > limit:
        size = f"needs more than {MAX_CELLS} cells" if n is None else f"needs {n} cells ({n * len(structure)} sites > {limit})"
        raise ValueError(f"no ordered approximant of site {where}: {size}; supply an ordered supercell")
    scale = _scaling(structure, n)
    cell = structure * scale
    guessed = False
    if len(cell.composition.elements) <= _MAX_GUESS_ELEMENTS:
        try:
            cell.add_oxidation_state_by_guess()
            guessed = abs(cell.charge) < 1e-6 and any(getattr(sp, "oxi_state", 0) for sp in cell.composition)
        except Exception:  # no neutral guess: order with equal charges instead
            guessed = False
        if not guessed:
            cell = structure * scale
    try:
        ordered = OrderDisorderedStructureTransformation(no_oxi_states=not guessed).apply_transformation(cell)
    except Exception as exc:  # pymatgen raises ValueError, IndexError, ... on odd occupancies
        raise ValueError(f"no ordered approximant of site {where}: {type(exc).__name__}: {exc}") from None
    ordered.remove_oxidation_states()
    how = "Ewald ordering with guessed oxidation states" if guessed else "Ewald ordering with equal charges"
    note = (
        f"ordered approximant of disordered site {where}: {'x'.join(map(str, scale))} supercell, "
        f"{len(ordered)} atoms, {how} (pymatgen OrderDisorderedStructureTransformation)"
    )
    ordered.properties = {**(structure.properties or {}), NOTE: note}
    return ordered


def ordered_item(sid: str, obj: Any, *, max_atoms: int) -> Any:
    """``obj`` itself, its ordered approximant, or a DISORDERED Rejection saying why there is none."""
    if not hasattr(obj, "is_ordered") or obj.is_ordered:
        return obj
    try:
        return ordered_approximant(obj, max_atoms=max_atoms)
    except ValueError as exc:
        return Rejection(sid, DISORDERED, str(exc))


def order_entry(entry: Entry, *, max_atoms: int) -> Entry:
    """``entry`` with a disordered structure replaced by its ordered approximant (or a failure)."""
    made = ordered_item(entry.id, entry.structure, max_atoms=max_atoms) if entry.structure is not None else None
    if made is None or made is entry.structure:
        return entry
    if isinstance(made, Rejection):
        return replace(entry, structure=None, failure=(made.reason, made.detail))
    return replace(entry, structure=made)


# pymatgen's CIF warnings: ``formats.text_structure_entry`` catches them and logs each at DEBUG as
# ``"%s: %s" % (path, message)``. ``parser_warnings`` collects those records while it is active and
# drops the ones the logger would not have emitted, so nothing new is printed.
_FORMATS_LOG = logging.getLogger("matbalora.data.formats")
_LOCK = threading.Lock()
_ACTIVE: list[dict[str, list[str]]] = []
_SAVED: dict[str, int] = {}


class _Collect(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.levelno == logging.DEBUG and record.msg == "%s: %s" and len(args) == 2:
            for found in list(_ACTIVE):
                found.setdefault(str(args[0]), []).append(str(args[1]))
        return record.levelno >= _SAVED.get("effective", logging.WARNING)


_FILTER = _Collect()


@contextmanager
def parser_warnings() -> Iterator[dict[str, list[str]]]:
    """``{path: [message, ...]}`` of the warnings pymatgen gave while the block read files."""
    found: dict[str, list[str]] = {}
    with _LOCK:
        if not _ACTIVE:
            _SAVED.update(level=_FORMATS_LOG.level, effective=_FORMATS_LOG.getEffectiveLevel())
            _FORMATS_LOG.addFilter(_FILTER)
            _FORMATS_LOG.setLevel(logging.DEBUG)
        _ACTIVE.append(found)
    try:
        yield found
    finally:
        with _LOCK:
            _ACTIVE[:] = [f for f in _ACTIVE if f is not found]
            if not _ACTIVE:
                _FORMATS_LOG.setLevel(_SAVED["level"])
                _FORMATS_LOG.removeFilter(_FILTER)


def warning_text(messages: list[str]) -> str:
    """pymatgen's messages as one line: split, without its 'Issues encountered' prefix, deduplicated."""
    lines = []
    for message in messages:
        for line in str(message).splitlines():
            line = line.removeprefix("Issues encountered while parsing CIF:").strip()
            if line:
                lines.append(line)
    return "; ".join(dict.fromkeys(lines))
