"""The structure column of the predict page: the summary table and the 3D view (the unit cell with
its atoms and their images on the cell faces, bonds from pymatgen's local-environment strategies,
cation coordination polyhedra, the a, b, c axes labelled).

Bonds come from ``CrystalNN`` for cells up to ``CRYSTALNN_MAX_ATOMS`` atoms (pymatgen's default
local-environment strategy), and from a nearest-neighbour distance cutoff for larger cells or when
``CrystalNN`` runs past its time budget: every neighbour within ``(1 + tol)`` times the site's
nearest-neighbour distance. Above ``BONDS_MAX_ATOMS`` no bonds are drawn.

Measured (a shared 2-core CPU, niced; pymatgen 2026.10, plotly 7.1; headless Chromium with
SwiftShader WebGL, page load to first draw, plotly.js included):

    crystal (atoms)          bonds                    figure   browser draw
    rutile TiO2 (6)          CrystalNN 0.08-0.15 s    0.06 s   1.0-1.2 s
    Cu5(Si2O7)2 (92)         CrystalNN 1.5-2.3 s      0.1 s    1.3-1.7 s
                             cutoff 0.01 s
    SbSe5F6 (192)            cutoff 0.01-0.02 s       0.1 s    1.1-1.5 s

CrystalNN costs about 20 ms per atom, hence its bound of 60 atoms (about 1.5 s, once per structure:
the app caches the bonds). py3Dmol/stmol were the alternative; they load 3Dmol.js from a CDN
(cdn.jsdelivr.net) in the browser, so the view would be blank offline.

A polyhedron is drawn around a site whose neighbours are all of more electronegative elements
(a cation) when it has 4 to 8 of them: the convex hull of the neighbours (``scipy.spatial.ConvexHull``),
one translucent ``Mesh3d`` per element. Its corners outside the cell are drawn as small atoms.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from pymatgen.core import Structure

CRYSTALNN_MAX_ATOMS = 60  # cells up to this size get CrystalNN bonds; larger ones the distance cutoff
BONDS_MAX_ATOMS = 500  # no bonds above this many atoms (the app admits 200)
CRYSTALNN_SECONDS = 3.0  # CrystalNN stops after this and the cutoff strategy is used instead
CUTOFF_TOL = 0.15  # cutoff strategy: neighbours within (1 + tol) x the nearest-neighbour distance
POLYHEDRON_CN = (4, 8)  # coordination numbers that get a polyhedron
AXIS_COLORS = {"a": "#d62728", "b": "#2ca02c", "c": "#1f77b4"}
Strategy = Literal["auto", "crystalnn", "cutoff"]


@dataclass(frozen=True)
class Bonds:
    """Each site's neighbours as Cartesian bond vectors (Å) to the neighbour's periodic image.

    ``neighbours[i]``: ``(j, vector)`` pairs, symmetric (j lists i with ``-vector``);
    ``strategy``: what found them, in words; ``seconds``: the time it took.
    """

    neighbours: tuple[tuple[tuple[int, tuple[float, float, float]], ...], ...]
    strategy: str
    seconds: float = 0.0

    def coordination(self, i: int) -> int:
        return len(self.neighbours[i])

    @property
    def count(self) -> int:
        """Bonds in the crystal per cell (each pair once)."""
        return sum(len(n) for n in self.neighbours) // 2


Found = list[list[tuple[int, tuple[int, int, int]]]]  # per site: (neighbour site, its lattice image)


def _crystalnn(structure: Structure, deadline: float) -> Found | None:
    """CrystalNN's neighbours of every site (None once ``deadline``, ``time.monotonic()``, passes)."""
    import warnings

    from pymatgen.analysis.local_env import CrystalNN

    nn = CrystalNN()
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No oxidation states specified on sites!" and the like
        for i, site in enumerate(structure):
            if time.monotonic() > deadline:
                return None
            found.append([(int(d["site_index"]), tuple(int(x) for x in d["image"])) for d in nn.get_nn_info(structure, i)])
    return found


def _cutoff(structure: Structure, tol: float) -> Found:
    """Every neighbour within ``(1 + tol)`` x each site's nearest-neighbour distance (one vectorised
    neighbour search out to 1.5 x the largest nearest-neighbour distance, at most 8 Å)."""
    found: Found = [[] for _ in structure]
    r = 4.0
    while True:
        centre, other, images, dist = structure.get_neighbor_list(r)
        nearest = np.full(len(structure), np.inf)
        np.minimum.at(nearest, centre, dist)
        if np.isfinite(nearest).all() or r >= 8.0:
            break
        r *= 1.5
    for c, o, img, d in zip(centre, other, images, dist):
        if d <= (1 + tol) * nearest[c]:
            found[c].append((int(o), tuple(int(x) for x in img)))
    return found


def _symmetric(structure: Structure, found: Found) -> tuple:
    """Each bond listed from both ends, once, as ``(j, Cartesian vector i -> image of j)`` (Å)."""
    seen: list[set[tuple[int, tuple[int, int, int]]]] = [set() for _ in found]
    for i, pairs in enumerate(found):
        for j, img in pairs:
            seen[i].add((j, img))
            seen[j].add((i, (-img[0], -img[1], -img[2])))
    lat, cart = structure.lattice.matrix, structure.cart_coords
    return tuple(tuple((j, tuple(float(x) for x in cart[j] + np.array(img) @ lat - cart[i])) for j, img in sorted(pairs))
                 for i, pairs in enumerate(seen))


def find_bonds(structure: Structure, *, strategy: Strategy = "auto", tol: float = CUTOFF_TOL) -> Bonds:
    """The bonds of ``structure``: ``"crystalnn"``, ``"cutoff"`` (see the module docstring), or
    ``"auto"``: CrystalNN up to ``CRYSTALNN_MAX_ATOMS`` atoms and ``CRYSTALNN_SECONDS``, else the cutoff.
    No bonds (``strategy`` says why) above ``BONDS_MAX_ATOMS`` atoms."""
    if strategy not in ("auto", "crystalnn", "cutoff"):
        raise ValueError(f"strategy={strategy!r}; choose 'auto', 'crystalnn' or 'cutoff'")
    start = time.perf_counter()
    n = len(structure)
    if n > BONDS_MAX_ATOMS:
        return Bonds(tuple(() for _ in structure), f"none: more than {BONDS_MAX_ATOMS} atoms")
    found = None
    if strategy == "crystalnn" or (strategy == "auto" and n <= CRYSTALNN_MAX_ATOMS):
        deadline = math.inf if strategy == "crystalnn" else time.monotonic() + CRYSTALNN_SECONDS
        found, name = _crystalnn(structure, deadline), "CrystalNN"
    if found is None:
        found, name = _cutoff(structure, tol), f"distance cutoff ({1 + tol:g} x nearest neighbour)"
    return Bonds(_symmetric(structure, found), name, time.perf_counter() - start)


def polyhedron_centres(structure: Structure, bonds: Bonds) -> list[int]:
    """Sites that get a coordination polyhedron: 4 to 8 neighbours, all of a more electronegative
    element (Pauling scale; sites of elements without one get none)."""
    centres = []
    for i, site in enumerate(structure):
        x = site.specie.X
        pairs = bonds.neighbours[i]
        if not math.isfinite(x) or not POLYHEDRON_CN[0] <= len(pairs) <= POLYHEDRON_CN[1]:
            continue
        if all(math.isfinite(structure[j].specie.X) and structure[j].specie.X > x for j, _ in pairs):
            centres.append(i)
    return centres


def _hull(points: np.ndarray) -> np.ndarray:
    """[n_faces, 3] vertex indices of the convex hull of ``points`` [n, 3] (Å); a flat set (e.g. a
    square-planar site) is joggled so it still gives faces."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return ConvexHull(points).simplices
    except QhullError:
        return ConvexHull(points, qhull_options="QJ").simplices


@functools.cache
def _element_colors() -> dict[str, str]:
    import pymatgen.vis
    from monty.serialization import loadfn

    table = loadfn(Path(pymatgen.vis.__file__).parent / "ElementColorSchemes.yaml")["Jmol"]
    return {el: f"rgb({r},{g},{b})" for el, (r, g, b) in table.items()}


def _drawn_sites(structure: Structure) -> tuple[np.ndarray, np.ndarray]:
    """The atoms the cell shows: every site wrapped into the cell plus its images on the faces
    opposite the faces it lies on; (site index [m], Cartesian position [m, 3] Å)."""
    frac = np.mod(structure.frac_coords, 1.0)
    frac[np.isclose(frac, 1.0, atol=1e-4)] = 0.0
    shifts = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    index, pos = [], []
    for i, f in enumerate(frac):
        for s in shifts:
            if np.all((s == 0) | np.isclose(f, 0.0, atol=1e-4)):
                index.append(i)
                pos.append((f + s) @ structure.lattice.matrix)
    return np.array(index, dtype=int), np.array(pos, dtype=float).reshape(-1, 3)


def _key(p: np.ndarray) -> tuple:
    return tuple(np.round(p, 2))


def _segments(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[3 n, 3] points of ``n`` line segments, NaN rows between them (one plotly trace)."""
    line = np.full((3 * len(pairs), 3), np.nan)
    for n, (a, b) in enumerate(pairs):
        line[3 * n], line[3 * n + 1] = a, b
    return line


def cell_figure(structure: Structure, bonds: Bonds | None = None, *, polyhedra: bool = True) -> go.Figure:
    """Interactive 3D unit cell: atoms coloured by element (with their images on the cell faces),
    bonds (``bonds``, default ``find_bonds(structure)``) as sticks coloured half by half, cation
    polyhedra (``polyhedra``), the cell edges with a, b, c labelled. Bonds that leave the cell stop
    halfway, at the boundary between the two atoms."""
    import plotly.graph_objects as go

    bonds = find_bonds(structure) if bonds is None else bonds
    if len(bonds.neighbours) != len(structure):
        raise ValueError(f"bonds of {len(bonds.neighbours)} sites for a structure of {len(structure)}")
    lat = structure.lattice.matrix
    colors = _element_colors()
    species = [site.specie.symbol for site in structure]
    index, pos = _drawn_sites(structure)
    centres = polyhedron_centres(structure, bonds) if polyhedra else []
    home = {i: pos[np.flatnonzero(index == i)[0]] for i in centres}  # each centre's own position in the cell
    drawn = {_key(p) for p in pos}
    corners: dict[tuple, tuple[int, np.ndarray]] = {}  # polyhedron corners outside the cell
    for i in centres:
        for j, vec in bonds.neighbours[i]:
            p = home[i] + np.asarray(vec)
            if _key(p) not in drawn:
                corners[_key(p)] = (j, p)
    extent = float(np.linalg.norm(pos.max(axis=0) - pos.min(axis=0))) if len(pos) > 1 else 1.0  # Å
    fig = go.Figure()
    for el in sorted(set(species)):
        xyz = pos[[species[i] == el for i in index]]
        radius = float(getattr(structure[species.index(el)].specie, "atomic_radius", None) or 1.0)
        size = max(4.0, min(6 + 8 * radius, 150 * radius / extent))  # marker pixels: smaller in larger cells
        fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=el, legendgroup=el,
                                   marker={"size": size, "color": colors.get(el, "grey"),
                                           "line": {"width": 1, "color": "black"}},
                                   hovertemplate=f"{el}<br>(%{{x:.2f}}, %{{y:.2f}}, %{{z:.2f}}) Å<extra></extra>"))
    if corners:
        outside = np.array([p for _, p in corners.values()])
        fig.add_trace(go.Scatter3d(x=outside[:, 0], y=outside[:, 1], z=outside[:, 2], mode="markers",
                                   name="polyhedron corners outside the cell", opacity=0.5,
                                   marker={"size": max(3.0, min(6.0, 60 / extent)),
                                           "color": [colors.get(species[j], "grey") for j, _ in corners.values()]},
                                   hovertemplate="%{text}<extra>outside the cell</extra>",
                                   text=[species[j] for j, _ in corners.values()]))
    _add_bonds(fig, bonds, species, index, pos, corners, colors, max(2.0, min(6.0, 60 / extent)))
    _add_polyhedra(fig, structure, bonds, centres, home, colors)
    for name, vec in zip("abc", lat):  # the axes, labelled at the far end of the edges from the origin
        fig.add_trace(go.Scatter3d(x=[0, vec[0]], y=[0, vec[1]], z=[0, vec[2]], mode="lines+text", text=["", name],
                                   textposition="top center", line={"color": AXIS_COLORS[name], "width": 7},
                                   textfont={"size": 18, "color": AXIS_COLORS[name]}, hoverinfo="skip", showlegend=False))
    shifts = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    edges = [(shifts[a] @ lat, shifts[b] @ lat) for a in range(8) for b in range(a + 1, 8)
             if np.abs(shifts[a] - shifts[b]).sum() == 1]
    line = _segments(edges)
    fig.add_trace(go.Scatter3d(x=line[:, 0], y=line[:, 1], z=line[:, 2], mode="lines", name="cell",
                               line={"color": "black", "width": 3}, hoverinfo="skip", showlegend=False))
    axis = {"showbackground": False, "showgrid": False, "zeroline": False, "showticklabels": False, "title": ""}
    fig.update_layout(scene={"aspectmode": "data", "xaxis": axis, "yaxis": axis, "zaxis": axis,
                             "camera": {"eye": {"x": 1.9, "y": 1.9, "z": 1.3}}},
                      height=480, margin={"l": 0, "r": 0, "t": 0, "b": 0},  # the legend below: the cell gets the width
                      legend={"itemsizing": "constant", "orientation": "h", "yanchor": "top", "y": 0.02, "x": 0,
                              "font": {"size": 11}, "title": {"text": f"bonds: {bonds.strategy}", "side": "top"}})
    return fig


def _add_bonds(fig, bonds, species, index, pos, corners, colors, width) -> None:
    """Half-sticks from every drawn atom towards each neighbour, coloured by the atom's element, one
    trace per element; a bond between two drawn atoms is then whole, one leaving the cell ends halfway."""
    import plotly.graph_objects as go

    halves: dict[str, list] = {}
    starts = list(zip(index, pos)) + [(j, p) for j, p in corners.values()]
    for i, p in starts:
        for _, vec in bonds.neighbours[i]:
            halves.setdefault(species[i], []).append((p, p + 0.5 * np.asarray(vec)))
    for n, (el, pairs) in enumerate(sorted(halves.items())):
        line = _segments(pairs)
        fig.add_trace(go.Scatter3d(x=line[:, 0], y=line[:, 1], z=line[:, 2], mode="lines", name="bonds",
                                   legendgroup="bonds", showlegend=n == 0, hoverinfo="skip",
                                   line={"color": colors.get(el, "grey"), "width": width}))


def _add_polyhedra(fig, structure, bonds, centres, home, colors) -> None:
    """One translucent Mesh3d per centre element: the convex hulls of its sites' neighbours."""
    import plotly.graph_objects as go

    by_element: dict[str, list[int]] = {}
    for i in centres:
        by_element.setdefault(structure[i].specie.symbol, []).append(i)
    for el, sites in sorted(by_element.items()):
        points, faces = [], []
        for i in sites:
            corner = home[i] + np.array([vec for _, vec in bonds.neighbours[i]])
            faces.append(_hull(corner) + sum(len(p) for p in points))
            points.append(corner)
        xyz, ijk = np.concatenate(points), np.concatenate(faces)
        cns = sorted({bonds.coordination(i) for i in sites})
        fig.add_trace(go.Mesh3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], i=ijk[:, 0], j=ijk[:, 1], k=ijk[:, 2],
                                color=colors.get(el, "grey"), opacity=0.35, flatshading=True, hoverinfo="skip",
                                name=f"{el} polyhedra (CN {', '.join(map(str, cns))})", showlegend=True))


def summarize(structure: Structure) -> dict[str, Any]:
    """Formula, space group, lattice (Å, degrees), volume (Å^3), atom count, density (g/cm^3)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        space_group = f"{sga.get_space_group_symbol()} ({sga.get_space_group_number()})"
        system = sga.get_crystal_system()
    except Exception:  # noqa: BLE001 - spglib fails on odd cells; the summary is useful without it
        space_group, system = "undetermined", "undetermined"
    lat = structure.lattice
    return {
        "formula": structure.composition.reduced_formula,
        "cell formula": structure.composition.formula.replace(" ", ""),
        "space group": space_group,
        "crystal system": system,
        "atoms": len(structure),
        "a, b, c (Å)": ", ".join(f"{x:.3f}" for x in lat.abc),
        "α, β, γ (°)": ", ".join(f"{x:.2f}" for x in lat.angles),
        "volume (Å³)": round(lat.volume, 2),
        "density (g/cm³)": round(float(structure.density), 3),
    }

