"""Local formats: extended XYZ (plain, gzip, .xyz), structure folders + CSV, pymatgen JSON."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from ase import Atoms
from ase.io import write
from pymatgen.core import Lattice, Structure

from matbalora.data import extxyz
from matbalora.data.dataset import BandGapDataset, Rejection
from matbalora.data.readers import load_dataset, read_structures
from matbalora.data.validation import (
    BAD_LATTICE,
    MISSING_STRUCTURE,
    MISSING_TARGET,
    TOO_MANY_ATOMS,
    UNPARSABLE,
)


def silicon() -> Structure:
    return Structure(Lattice.cubic(5.43), ["Si"] * 8, [
        [0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
        [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75],
    ])  # fmt: skip


def rocksalt(a: float = 5.64, species=("Na", "Cl")) -> Structure:
    """Primitive two-atom rock-salt cell."""
    h = a / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def frames() -> list[Atoms]:
    out = []
    for i, (s, gap) in enumerate([(silicon(), 0.61), (rocksalt(), 5.0), (rocksalt(6.29, ("K", "Cl")), 5.1)]):
        atoms = Atoms([site.specie.symbol for site in s], positions=s.cart_coords, cell=s.lattice.matrix, pbc=True)
        atoms.info.update(material_id=f"m-{i}", band_gap=gap)
        out.append(atoms)
    return out


@pytest.fixture
def xyz_file(tmp_path):
    path = tmp_path / "three.extxyz"
    write(path, frames(), format="extxyz")
    return path


def test_extxyz_plain_and_gzip_agree(xyz_file, tmp_path):
    gz = tmp_path / "three.extxyz.gz"
    gz.write_bytes(gzip.compress(xyz_file.read_bytes()))
    plain, packed = load_dataset(xyz_file), load_dataset(gz)
    assert plain.ids == packed.ids == ["m-0", "m-1", "m-2"]
    np.testing.assert_allclose(plain.targets, [0.61, 5.0, 5.1])
    np.testing.assert_allclose(plain.structures[0].cart_coords, silicon().cart_coords, atol=1e-12)
    assert plain.structures[2].composition.reduced_formula == "KCl"
    assert plain.provenance["format"] == "extxyz" and len(plain.provenance["sha256"]) == 64
    assert plain.provenance["sha256"] != packed.provenance["sha256"]
    assert len(extxyz.read_extxyz(gz, limit=2)) == 2


def test_max_structures_stops_reading(xyz_file):
    # garbage after frame 3: a full read reports it, a limited read never reaches it
    with open(xyz_file, "a") as fh:
        fh.write('not-a-count\nLattice="1 0 0 0 1 0 0 0 1"\n')
    full = load_dataset(xyz_file)
    assert len(full) == 3 and [r.reason for r in full.rejected] == [UNPARSABLE]
    assert "#3" in full.rejected[0].id_or_path
    limited = load_dataset(xyz_file, max_structures=2)
    assert limited.ids == ["m-0", "m-1"] and limited.rejected == []


def test_oversized_frame_skipped_unparsed(xyz_file, monkeypatch):
    parsed = []
    real = extxyz.parse_frame

    def counting(frame):
        parsed.append(frame.index)
        return real(frame)

    monkeypatch.setattr("matbalora.data.formats.parse_frame", counting)
    ds = load_dataset(xyz_file, max_atoms=4)  # silicon has 8 atoms
    assert ds.ids == ["m-1", "m-2"] and parsed == [1, 2]
    assert ds.rejected == [ds.rejected[0]] and ds.rejected[0].id_or_path == "m-0"
    assert ds.rejected[0].reason == TOO_MANY_ATOMS and "not parsed" in ds.rejected[0].detail


def test_bad_frame_does_not_lose_the_file(xyz_file):
    lines = xyz_file.read_text().splitlines()
    lines[2] = "Si  0.0  zero  0.0"  # first atom line of frame 0
    xyz_file.write_text("\n".join(lines) + "\n")
    ds = load_dataset(xyz_file)
    assert ds.ids == ["m-1", "m-2"]
    assert ds.rejected[0].reason == UNPARSABLE and ds.rejected[0].id_or_path.endswith("#0")


def test_plain_xyz_without_cell_is_bad_lattice(tmp_path):
    path = tmp_path / "mol.xyz"
    path.write_text("2\nband_gap=3.0\nH 0 0 0\nH 0 0 0.74\n")
    ds = load_dataset(path)
    assert len(ds) == 0 and ds.rejected[0].reason == BAD_LATTICE
    assert "periodic" in ds.rejected[0].detail


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "structs"
    root.mkdir()
    silicon().to(filename=str(root / "si.cif"))
    rocksalt().to(filename=str(root / "nacl.vasp"), fmt="poscar")
    rocksalt(6.29, ("K", "Cl")).to(filename=str(root / "POSCAR"), fmt="poscar")
    rocksalt(5.7, ("K", "F")).to(filename=str(root / "CONTCAR"), fmt="poscar")
    (root / "kbr.json").write_text(json.dumps(rocksalt(6.6, ("K", "Br")).as_dict()))
    (root / "broken.cif").write_text("data_x\n_cell_length_a oops\n")
    (root / "notes.txt").write_text("not a structure")
    (root / "targets.csv").write_text("id,band_gap\nsi,0.61\nnacl,5.0\nPOSCAR,5.1\nkbr,4.2\nbroken,1.0\nghost,2.0\n")
    return root


def test_folder_with_csv(folder):
    ds = load_dataset(folder)
    assert sorted(ds.ids) == ["POSCAR", "kbr", "nacl", "si"]
    gaps = dict(zip(ds.ids, ds.targets, strict=True))
    assert gaps == {"si": 0.61, "nacl": 5.0, "POSCAR": 5.1, "kbr": 4.2}
    reasons = {r.id_or_path: r.reason for r in ds.rejected}
    assert reasons == {"CONTCAR": MISSING_TARGET, "broken": UNPARSABLE, "ghost": MISSING_STRUCTURE}
    assert ds.provenance["format"] == "folder" and ds.provenance["targets_csv"] == "targets.csv"
    assert ds.structures[ds.ids.index("si")].composition.reduced_formula == "Si"


def test_folder_headerless_csv_and_limit(folder):
    (folder / "targets.csv").write_text("si,0.61\nnacl,5.0\n")
    ds = load_dataset(folder, max_structures=2)  # files sorted: CONTCAR, POSCAR
    assert ds.provenance["n_read"] == 2 and len(ds) == 0
    assert {r.reason for r in ds.rejected} == {MISSING_TARGET}


def test_folder_needs_csv_unless_prediction(folder):
    (folder / "targets.csv").unlink()
    with pytest.raises(ValueError, match="no CSV"):
        load_dataset(folder)
    ds = load_dataset(folder, require_target=False)
    assert len(ds) == 5 and np.isnan(ds.targets).all()


def test_json_single_and_records(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps(silicon().as_dict()))
    assert load_dataset(single, require_target=False).ids == ["one"]
    assert load_dataset(single).rejected[0].reason == MISSING_TARGET
    records = tmp_path / "many.json"
    records.write_text(json.dumps([
        {"id": "a", "structure": silicon().as_dict(), "band_gap": 0.6},
        {"structure": rocksalt().as_dict(), "band_gap": 5.0},
        {"id": "c", "structure": {"lattice": "nonsense", "sites": []}, "band_gap": 1.0},
        [1, 2, 3],
    ]))  # fmt: skip
    ds = load_dataset(records)
    assert ds.ids == ["a", "many#1"]
    assert [(r.id_or_path, r.reason) for r in ds.rejected] == [("c", UNPARSABLE), ("many#3", UNPARSABLE)]


def test_dataset_container(xyz_file):
    ds = load_dataset(xyz_file)
    frame = ds.to_frame()
    assert list(frame.columns) == ["id", "formula", "n_atoms", "band_gap"]
    assert frame["formula"].tolist() == ["Si", "NaCl", "KCl"] and frame["n_atoms"].tolist() == [8, 2, 2]
    sub = ds.subset([2, 0])
    assert isinstance(sub, BandGapDataset) and sub.ids == ["m-2", "m-0"]
    np.testing.assert_allclose(sub.targets, [5.1, 0.61])
    with pytest.raises(ValueError, match="out of range"):
        ds.subset([3])
    with pytest.raises(ValueError, match="unique"):
        BandGapDataset(ds.structures[:2], np.zeros(2), ["x", "x"])


def test_read_structures_for_prediction(folder, xyz_file):
    (folder / "targets.csv").unlink()
    out = read_structures([folder, xyz_file])
    ids = [i for i, _ in out]
    assert ids == ["CONTCAR", "POSCAR", "broken", "kbr", "nacl", "si", "m-0", "m-1", "m-2"]
    kinds = {i: type(v).__name__ for i, v in out}
    assert kinds["broken"] == "Rejection" and kinds["si"] == "Structure" and kinds["m-2"] == "Structure"
    (one,) = read_structures(str(folder / "si.cif"))
    assert one[0] == "si" and isinstance(one[1], Structure)
    lonely = folder / "lonely.json"
    lonely.write_text(json.dumps(Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]]).as_dict()))
    (rej,) = read_structures(lonely)
    assert isinstance(rej[1], Rejection) and rej[1].reason == "isolated_atom"


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.extxyz")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dataset(tmp_path / "data.parquet")
    with pytest.raises(ValueError, match="max_structures"):
        load_dataset(tmp_path / "data.parquet", max_structures=-1)
