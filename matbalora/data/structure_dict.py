"""A pymatgen Structure from its ``as_dict()`` form, built from plain values only.

``Structure.from_dict`` passes every site property through ``MontyDecoder``, which imports the
module an ``{"@module": ..., "@class": ...}`` object names and calls into it: a JSON file could run
code of its author's choosing, or build a tensor of any size from a few hundred bytes. Here the
lattice, species, coordinates and properties are read as numbers, strings and short lists with
their sizes bounded, and the Structure is built from those; an object inside a property is refused
with its name, never looked up. The ``@module``/``@class`` keys of the structure itself are ignored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from matbalora.data.validation import BAD_LATTICE, TOO_MANY_ATOMS, UNPARSABLE, check_cheap

if TYPE_CHECKING:
    from pymatgen.core import Structure

#: Values one site or structure property may hold (a magnetic moment, forces, selective dynamics: 3).
MAX_PROPERTY_VALUES = 64
#: Properties one site (or the structure) may carry.
MAX_PROPERTIES = 32
#: Species one site may list (a disordered site mixes a few elements).
MAX_SPECIES = 16
#: Characters of a string value (element symbol, label, property text).
MAX_STRING_CHARS = 256
_LATTICE_PARAMETERS = ("a", "b", "c", "alpha", "beta", "gamma")


class BadDict(ValueError):
    """A structure dict that cannot be read: ``reason`` (a validation constant) and the message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadDict(UNPARSABLE, f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _vector(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 3:
        raise BadDict(UNPARSABLE, f"{what} is not a list of 3 numbers")
    return [_number(x, what) for x in value]


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING_CHARS:
        raise BadDict(UNPARSABLE, f"{what} is not a string of at most {MAX_STRING_CHARS} characters")
    return value


def lattice_matrix(data: Any) -> np.ndarray:
    """[3, 3] Å (rows are vectors) of a Lattice dict: ``matrix``, or ``a, b, c, alpha, beta, gamma``."""
    from pymatgen.core import Lattice

    if not isinstance(data, dict):
        raise BadDict(UNPARSABLE, f"'lattice' is {type(data).__name__}, expected an object")
    pbc = data.get("pbc", [True, True, True])
    if not isinstance(pbc, list | tuple) or len(pbc) != 3 or not all(x is True for x in pbc):
        raise BadDict(BAD_LATTICE, f"not periodic in all three directions (pbc={pbc!r})")
    if "matrix" in data:
        rows = data["matrix"]
        if not isinstance(rows, list) or len(rows) != 3:
            raise BadDict(UNPARSABLE, "'lattice.matrix' is not 3 rows of 3 numbers")
        return np.array([_vector(row, "'lattice.matrix' row") for row in rows], dtype=np.float64)
    if all(key in data for key in _LATTICE_PARAMETERS):
        values = [_number(data[key], f"'lattice.{key}'") for key in _LATTICE_PARAMETERS]
        if not all(math.isfinite(x) for x in values):
            return np.full((3, 3), np.nan)  # refused as NON_FINITE by the cheap checks
        return Lattice.from_parameters(*values).matrix
    raise BadDict(UNPARSABLE, "'lattice' has neither 'matrix' nor a, b, c, alpha, beta, gamma")


def plain_value(value: Any, what: str) -> Any:
    """``value`` when it is a number, string, bool, None or a (nested) list of those holding at
    most MAX_PROPERTY_VALUES values; BadDict for anything else (objects are never decoded)."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        count += 1
        if count > MAX_PROPERTY_VALUES:
            raise BadDict(UNPARSABLE, f"{what} holds more than {MAX_PROPERTY_VALUES} values")
        if isinstance(item, dict):
            named = ".".join(str(item[k])[:80] for k in ("@module", "@class") if k in item)
            raise BadDict(UNPARSABLE, f"{what} is an object{f' ({named})' if named else ''}; only numbers, "
                                      "strings and short lists are read (no class lookup)")
        if isinstance(item, str):
            _string(item, what)
        elif item is not None and not isinstance(item, bool | int | float):
            raise BadDict(UNPARSABLE, f"{what} is {type(item).__name__}")
    return value


def _properties(data: Any, what: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict) or len(data) > MAX_PROPERTIES:
        raise BadDict(UNPARSABLE, f"{what} is not an object of at most {MAX_PROPERTIES} entries")
    return {_string(key, f"{what} key"): plain_value(value, f"{what} {key!r}") for key, value in data.items()}


def _species(data: Any, what: str) -> dict:
    """``{Element | Species | DummySpecies: occupancy}`` as ``PeriodicSite.from_dict`` reads it."""
    from pymatgen.core import DummySpecies, Element, Species

    if not isinstance(data, list) or not 1 <= len(data) <= MAX_SPECIES:
        raise BadDict(UNPARSABLE, f"{what} 'species' is not a list of 1 to {MAX_SPECIES} entries")
    species: dict = {}
    for entry in data:
        if not isinstance(entry, dict):
            raise BadDict(UNPARSABLE, f"{what} species entry is {type(entry).__name__}, expected an object")
        symbol = _string(entry.get("element"), f"{what} 'element'")
        occu = _number(entry.get("occu", 1.0), f"{what} 'occu'")
        oxi = entry.get("oxidation_state")
        try:
            if "oxidation_state" in entry:
                oxi = None if oxi is None else _number(oxi, f"{what} 'oxidation_state'")
                sp = Species(symbol, oxi) if Element.is_valid_symbol(symbol) else DummySpecies(symbol, oxi)
            else:
                sp = Element(symbol)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadDict(UNPARSABLE, f"{what}: {symbol!r} is not an element ({exc})") from None
        species[sp] = occu
    return species


def _site(data: Any, index: int, lattice) -> Any:
    from pymatgen.core import PeriodicSite

    what = f"site {index}"
    if not isinstance(data, dict):
        raise BadDict(UNPARSABLE, f"{what} is {type(data).__name__}, expected an object")
    cartesian = "abc" not in data
    coords = _vector(data.get("xyz") if cartesian else data["abc"], f"{what} {'xyz' if cartesian else 'abc'}")
    label = data.get("label")
    return PeriodicSite(
        _species(data.get("species"), what), coords, lattice, coords_are_cartesian=cartesian,
        properties=_properties(data.get("properties"), f"{what} properties"),
        label=None if label is None else _string(label, f"{what} label"),
    )


def _check_sites(sites: Any, lattice: np.ndarray, *, max_atoms: int) -> None:
    """Size and finiteness of the cell and coordinates before any site object is built."""
    if not isinstance(sites, list):
        raise BadDict(UNPARSABLE, f"'sites' is {type(sites).__name__}, expected a list")
    if len(sites) > max_atoms:
        raise BadDict(TOO_MANY_ATOMS, f"{len(sites)} sites > max_atoms={max_atoms} (not parsed)")
    coords = []
    for i, site in enumerate(sites):
        key = "abc" if isinstance(site, dict) and "abc" in site else "xyz"
        coords.append(_vector(site.get(key) if isinstance(site, dict) else None, f"site {i} {key}"))
    cheap = check_cheap(len(sites), lattice, np.array(coords).reshape(-1, 3), max_atoms=max_atoms)
    if cheap is not None:
        raise BadDict(*cheap)


def structure_from_dict(data: dict, *, max_atoms: int) -> Structure | tuple[str, str]:
    """A pymatgen Structure from its ``as_dict()`` form; a ``(reason, detail)`` pair on failure."""
    from pymatgen.core import Lattice, Structure

    try:
        sites = data.get("sites")
        if isinstance(sites, list) and len(sites) > max_atoms:  # before anything else is read
            return TOO_MANY_ATOMS, f"{len(sites)} sites > max_atoms={max_atoms} (not parsed)"
        matrix = lattice_matrix(data.get("lattice"))
        _check_sites(sites, matrix, max_atoms=max_atoms)
        lattice = Lattice(matrix)
        charge = data.get("charge")
        charge = None if charge is None else _number(charge, "'charge'")
        built = [_site(site, i, lattice) for i, site in enumerate(sites)]
        return Structure.from_sites(built, charge=charge, properties=_properties(data.get("properties"), "structure properties"))
    except BadDict as exc:
        return exc.reason, str(exc)
    except Exception as exc:  # pymatgen's own checks (occupancy above 1, ...) raise many types
        return UNPARSABLE, f"structure dict: {type(exc).__name__}: {exc}"
