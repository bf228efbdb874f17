"""The structure column of the predict page: the summary table and the interactive 3D unit cell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from pymatgen.core import Structure


def _element_colors() -> dict[str, str]:
    import pymatgen.vis
    from monty.serialization import loadfn

    table = loadfn(Path(pymatgen.vis.__file__).parent / "ElementColorSchemes.yaml")["Jmol"]
    return {el: f"rgb({r},{g},{b})" for el, (r, g, b) in table.items()}


def cell_figure(structure: Structure) -> go.Figure:
    """Interactive 3D unit cell: atoms (with images on the cell faces) coloured by element, cell edges."""
    import plotly.graph_objects as go

    lat = structure.lattice.matrix
    frac = np.mod(structure.frac_coords, 1.0)
    frac[np.isclose(frac, 1.0, atol=1e-4)] = 0.0
    shifts = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    colors = _element_colors()
    fig = go.Figure()
    species = [site.specie.symbol for site in structure]
    for el in sorted(set(species)):
        rows = [i for i, s in enumerate(species) if s == el]
        on_face = [frac[i] + s for i in rows for s in shifts if np.all((s == 0) | np.isclose(frac[i], 0.0, atol=1e-4))]
        xyz = np.array(on_face) @ lat  # [n, 3] Å, each site plus its images on the opposite faces
        radius = float(getattr(structure[rows[0]].specie, "atomic_radius", None) or 1.0)
        fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=el,
                                   marker={"size": 6 + 8 * radius, "color": colors.get(el, "grey"),
                                           "line": {"width": 1, "color": "black"}},
                                   hovertemplate=f"{el}<br>(%{{x:.2f}}, %{{y:.2f}}, %{{z:.2f}}) Å<extra></extra>"))
    corners = shifts @ lat
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(shifts[a] - shifts[b]).sum() == 1]
    line = np.full((3 * len(edges), 3), np.nan)
    for n, (a, b) in enumerate(edges):
        line[3 * n], line[3 * n + 1] = corners[a], corners[b]
    fig.add_trace(go.Scatter3d(x=line[:, 0], y=line[:, 1], z=line[:, 2], mode="lines", name="cell",
                               line={"color": "black", "width": 3}, hoverinfo="skip", showlegend=False))
    axis = {"showbackground": False, "showgrid": False, "zeroline": False, "showticklabels": False, "title": ""}
    fig.update_layout(scene={"aspectmode": "data", "xaxis": axis, "yaxis": axis, "zaxis": axis,
                             "camera": {"eye": {"x": 1.9, "y": 1.9, "z": 1.3}}},
                      height=420, margin={"l": 0, "r": 0, "t": 0, "b": 0}, legend={"itemsizing": "constant"})
    return fig


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

