"""A crystal's interval depends only on the crystal and the seed (issue 15 item 1): alone or in a batch,
in any order, from any file format, as a supercell or rotated, in predict, screen and the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

import matbalora
from conftest import REPO, copper, perovskite, rocksalt_nacl, silicon
from matbalora.cli import main
from matbalora.data.crystal_key import crystal_key

EXAMPLES = REPO / "data" / "examples"
NUMBERS = ["band_gap", "std", "std_epistemic", "lower", "upper", "p_metal"]
EXACT = 1e-6  # eV: the same crystal, the same graph
ROUNDING = 1e-5  # eV: a rotated copy or a supercell is another graph of it (float rounding of the model)


def _rows(df: pd.DataFrame) -> np.ndarray:
    return df[NUMBERS].to_numpy(float)


def _rotated(structure):
    out = structure.copy()
    out.apply_operation(SymmOp.from_axis_angle_and_translation([1, 2, 0.5], 37.0))
    return out


def test_key_ignores_cell_choice_rotation_origin_and_site_order():
    for base in (silicon(), rocksalt_nacl(), copper(), perovskite()):
        key = crystal_key(base)
        supercell = base.copy()
        supercell.make_supercell([2, 1, 3])
        shifted = base.copy()
        shifted.translate_sites(range(len(shifted)), [0.13, 0.2, 0.71])
        shuffled = base.copy()
        shuffled = shuffled.from_sites(list(reversed(shuffled.sites)))
        jittered = base.copy()
        jittered.perturb(1e-4)  # the last digits a file format keeps
        inverted = Structure(base.lattice, base.species, -base.frac_coords)  # another setting of the same crystal
        assert {crystal_key(s) for s in (supercell, _rotated(base), shifted, shuffled, jittered, inverted)} == {key}
    assert len({crystal_key(s) for s in (silicon(), rocksalt_nacl(), copper(), perovskite())}) == 4
    # oxidation states are not what the network sees; zinc blende with As at 1/4 or 3/4 is one crystal
    nacl = rocksalt_nacl()
    ionic = nacl.copy()
    ionic.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    assert crystal_key(ionic) == crystal_key(nacl)
    gaas = [Structure.from_spacegroup("F-43m", Lattice.cubic(5.65), ["Ga", "As"], [[0, 0, 0], [x, x, x]]) for x in (0.25, 0.75)]
    assert crystal_key(gaas[0]) == crystal_key(gaas[1])


def test_same_crystal_same_numbers_alone_in_a_batch_and_in_any_order(shipped_like):
    model = matbalora.load_model()
    si, nacl, cu, sto = silicon(), rocksalt_nacl(), copper(), perovskite()
    alone = {name: _rows(model.predict([s]))[0] for name, s in (("si", si), ("nacl", nacl), ("cu", cu), ("sto", sto))}
    batch = _rows(model.predict([nacl, si, cu, si, sto, si, nacl, si]))
    for row, name in zip(batch, ["nacl", "si", "cu", "si", "sto", "si", "nacl", "si"]):
        np.testing.assert_allclose(row, alone[name], atol=EXACT, rtol=0)
    reverse = _rows(model.predict([sto, cu, si, nacl]))
    np.testing.assert_allclose(reverse, np.stack([alone[n] for n in ("sto", "cu", "si", "nacl")]), atol=EXACT, rtol=0)
    # a supercell and a rotated copy: the same draws, through another graph of the crystal
    copies = _rows(model.predict([_rotated(nacl), nacl.get_primitive_structure(), _supercell(si)]))
    np.testing.assert_allclose(copies, np.stack([alone["nacl"], alone["nacl"], alone["si"]]), atol=ROUNDING, rtol=0)
    # the seed is the user's: another seed, other draws; the same seed, the same numbers
    other = _rows(model.predict([si], seed=1))[0]
    assert np.abs(other - alone["si"])[1] > 1e-4
    np.testing.assert_array_equal(_rows(model.predict([si], seed=1))[0], other)


def _supercell(structure):
    out = structure.copy()
    out.make_supercell([1, 2, 2])
    return out


def test_draws_do_not_depend_on_how_they_are_split_into_passes(shipped_like):
    model = matbalora.load_model()
    prep = matbalora.predict.prepare(model.model, [silicon(), rocksalt_nacl(), perovskite()])
    whole = model.model.sample_gaps(prep.graphs, samples=8, keys=prep.keys).gaps
    rows = max(model.model.family.graph_rows(g) for g in prep.graphs)
    split = model.model.sample_gaps(prep.graphs, samples=8, keys=prep.keys, max_rows=2 * rows, batch_size=1).gaps  # 1 crystal, 2 draws a pass
    np.testing.assert_allclose(split, whole, atol=EXACT, rtol=0)


def test_byte_identical_files_and_other_formats_get_the_same_interval(shipped_like, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(8):
        shutil.copy(EXAMPLES / "Si_diamond.cif", folder / f"si_{k}.cif")
    kcl = Structure.from_file(EXAMPLES / "KCl_rocksalt.cif")
    kcl.to(filename=str(folder / "kcl.vasp"), fmt="poscar")
    kcl.to(filename=str(folder / "kcl.cif"))
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    write(folder / "kcl.extxyz", AseAtomsAdaptor.get_atoms(kcl), format="extxyz")
    out = tmp_path / "pred.csv"
    assert main(["predict", *map(str, sorted(folder.iterdir())), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    si = df[df["id"].str.contains("si_")]
    kcl_rows = df[df["id"].str.contains("kcl")]
    assert len(si) == 8 and len(kcl_rows) == 3
    np.testing.assert_allclose(_rows(si), np.repeat(_rows(si)[:1], 8, axis=0), atol=EXACT, rtol=0)
    np.testing.assert_allclose(_rows(kcl_rows), np.repeat(_rows(kcl_rows)[:1], 3, axis=0), atol=EXACT, rtol=0)
    # screen writes the rows predict writes, whatever its chunk size
    screened = matbalora.screen(sorted(folder.iterdir()), model=shipped_like / "balora", batch_size=3, progress=False)
    np.testing.assert_allclose(_rows(screened), _rows(df), atol=EXACT, rtol=0)
