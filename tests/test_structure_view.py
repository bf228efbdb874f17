"""The 3D structure view: bonds (CrystalNN, the distance cutoff for large cells), cation polyhedra, the figure."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import perovskite, rocksalt_nacl
from pymatgen.core import Lattice, Structure

from matbalora import app as sup
from matbalora.app import structure_view as sv


def rutile() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.3048, 0.3048, 0]])


def coordination(structure, bonds) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for i, site in enumerate(structure):
        found.setdefault(site.specie.symbol, set()).add(bonds.coordination(i))
    return found


@pytest.mark.parametrize("strategy", ["crystalnn", "cutoff"])
def test_rock_salt_and_rutile_bonds(strategy):
    nacl = rocksalt_nacl()  # conventional cell: 4 Na, 4 Cl
    bonds = sv.find_bonds(nacl, strategy=strategy)
    assert coordination(nacl, bonds) == {"Na": {6}, "Cl": {6}} and bonds.count == 24
    assert all(np.linalg.norm(vec) == pytest.approx(5.64 / 2) for pairs in bonds.neighbours for _, vec in pairs)
    tio2 = rutile()
    bonds = sv.find_bonds(tio2, strategy=strategy)
    assert coordination(tio2, bonds) == {"Ti": {6}, "O": {3}} and bonds.count == 12


def test_bonds_are_listed_from_both_ends():
    structure = rutile()
    bonds = sv.find_bonds(structure)
    for i, pairs in enumerate(bonds.neighbours):
        for j, vec in pairs:
            assert any(k == i and np.allclose(back, -np.array(vec)) for k, back in bonds.neighbours[j])


def test_strategy_follows_the_size_and_the_time_budget(monkeypatch):
    assert sv.find_bonds(rutile()).strategy == "CrystalNN"
    big = rocksalt_nacl() * (3, 3, 2)  # 144 atoms: above CRYSTALNN_MAX_ATOMS
    bonds = sv.find_bonds(big)
    assert bonds.strategy.startswith("distance cutoff") and coordination(big, bonds) == {"Na": {6}, "Cl": {6}}
    monkeypatch.setattr(sv, "CRYSTALNN_SECONDS", -1.0)  # out of time before the first site
    assert sv.find_bonds(rutile()).strategy.startswith("distance cutoff")
    monkeypatch.setattr(sv, "BONDS_MAX_ATOMS", 5)
    none = sv.find_bonds(rutile())
    assert none.strategy == "none: more than 5 atoms" and none.count == 0
    with pytest.raises(ValueError, match="strategy='voronoi'"):
        sv.find_bonds(rutile(), strategy="voronoi")


def test_polyhedra_go_around_cations_with_4_to_8_neighbours():
    for structure, centres in ((rocksalt_nacl(), {"Na": 4}), (rutile(), {"Ti": 2}), (perovskite(), {"Ti": 1}),
                               (sup.example("Si (diamond)").structure, {}), (sup.example("Cu (fcc metal)").structure, {})):
        found = sv.polyhedron_centres(structure, sv.find_bonds(structure))
        assert {el: sum(structure[i].specie.symbol == el for i in found) for el in centres} == centres
        assert len(found) == sum(centres.values())  # Sr (12 O) and the one-element crystals get none


def test_cell_figure_draws_bonds_polyhedra_and_labelled_axes():
    structure = rutile()
    fig = sup.cell_figure(structure, sv.find_bonds(structure))
    (mesh,) = [t for t in fig.data if t.type == "mesh3d"]
    assert mesh.name == "Ti polyhedra (CN 6)" and len(mesh.i) == 2 * 8  # two octahedra, 8 faces each
    bonds = [t for t in fig.data if t.type == "scatter3d" and t.mode == "lines" and t.name == "bonds"]
    assert {t.line.color for t in bonds} == {sv._element_colors()["Ti"], sv._element_colors()["O"]}
    labels = [t.text[-1] for t in fig.data if t.type == "scatter3d" and t.mode == "lines+text"]
    assert labels == ["a", "b", "c"] and fig.data[-1].name == "cell"
    assert "CrystalNN" in fig.layout.legend.title.text
    plain = sup.cell_figure(structure, polyhedra=False)
    assert not [t for t in plain.data if t.type == "mesh3d"]
    with pytest.raises(ValueError, match="bonds of 8 sites"):
        sup.cell_figure(structure, sv.find_bonds(rocksalt_nacl()))


def test_flat_coordination_still_gives_a_polyhedron():
    square = np.array([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0], [0, -1.0, 0]])  # square-planar: coplanar corners
    faces = sv._hull(square)
    assert faces.shape[1] == 3 and len(faces) >= 2
