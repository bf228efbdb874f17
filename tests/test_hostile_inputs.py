"""Hostile inputs (issue 18, items 1-7): no code runs, work and memory stay bounded, nothing is
lost or misread silently, and every message is one line naming the input.

The files are built by ``fuzz_cases.hostile_files`` (shared with the fuzz campaign). The last
test reads all of them in a child process under ``resource`` limits (address space and CPU time)
and checks the bounds the README states.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

import fuzz_cases as F
from matbalora.cli import main
from matbalora.data import bounded, precheck
from matbalora.data import validation as V
from matbalora.data.dataset import Rejection
from matbalora.data.readers import load_dataset, read_structures

REPO = Path(__file__).resolve().parents[1]


def _read_one(path, **kw) -> Rejection | Structure:
    (found,) = read_structures(path, **kw)
    return found[1]


def _refused(path, reason: str, *needles: str, seconds: float = 3.0) -> Rejection:
    start = time.process_time()
    got = _read_one(path)
    spent = time.process_time() - start
    assert isinstance(got, Rejection) and got.reason == reason, got
    for needle in needles:
        assert needle in got.detail, (needle, got.detail)
    assert spent < seconds, spent
    return got


# ------------------------------------------------------------------ 1. pymatgen JSON: no class lookup


def test_json_site_property_objects_are_never_imported(tmp_path, monkeypatch):
    """Before: MontyDecoder imported the module a site property named (its code ran)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil.json"
    path.write_bytes(F.hostile_files()["json_class_lookup.json"].replace(b"MODULE", b"evil_module"))
    _refused(path, V.UNPARSABLE, "is an object (evil_module.Evil)", "no class lookup")
    assert not marker.exists()
    assert "evil_module" not in sys.modules


def test_json_structure_is_built_from_plain_values(tmp_path):
    """The reader's Structure equals pymatgen's from_dict on an honest file, properties included."""
    salt = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]],
                     site_properties={"magmom": [0.5, -0.5]}, labels=["Na1", "Cl1"])
    path = tmp_path / "salt.json"
    path.write_text(json.dumps(salt.as_dict()))
    ours = _read_one(path)
    assert ours == Structure.from_dict(salt.as_dict()) and ours.site_properties == {"magmom": [0.5, -0.5]}
    assert [site.label for site in ours] == ["Na1", "Cl1"]


@pytest.mark.parametrize("change, needle", [
    ({"sites": "many"}, "'sites' is str"),
    ({"lattice": {"matrix": [[1, 0], [0, 1]]}}, "3 rows of 3 numbers"),
    ({"lattice": {"matrix": [[4, 0, 0], [0, 4, 0], [0, 0, True]]}}, "is bool, expected a number"),
])
def test_json_dict_checks_name_the_field(tmp_path, change, needle):
    data = Structure(Lattice.cubic(4.0), ["Na"], [[0, 0, 0]]).as_dict() | change
    (tmp_path / "x.json").write_text(json.dumps(data))
    _refused(tmp_path / "x.json", V.UNPARSABLE, needle)


# ------------------------------------------------------------------ 2. gzip: decompressed size, line length


def test_gzip_line_longer_than_the_bound_is_refused_while_streaming(tmp_path):
    """Before: the whole 64 MB comment line was read, then parsed (a 600 MB one grew past 9 GB)."""
    path = tmp_path / "long_line.extxyz.gz"
    path.write_bytes(F.hostile_files()["long_line.extxyz.gz"])
    _refused(path, V.UNPARSABLE, f"a line longer than {bounded.MAX_LINE_CHARS} characters")


def test_gzip_decompressed_size_is_capped(tmp_path):
    for name, needle in (("bomb.extxyz.gz", "decompressed is larger than"), ("whitespace.json.gz", "decompressed is larger than")):
        path = tmp_path / name
        path.write_bytes(F.hostile_files()[name])
        assert bounded.gzip_cap(path) == bounded.MIN_GZIP_BYTES
        _refused(path, V.UNPARSABLE, needle, "gunzip it")


def test_honest_gzip_within_the_ratio_is_read(tmp_path):
    path = tmp_path / "frames.extxyz.gz"
    path.write_bytes(gzip.compress(F.build_seeds()["extxyz"][1][1]))
    assert [sid for sid, obj in read_structures(path)] == ["m-0", "m-1", "m-2", "m-3"]


# ------------------------------------------------------------------ 3. CIF work bound


def test_cif_with_repeated_operations_is_refused_before_expansion(tmp_path):
    """Before: 150 sites x 192 copies of one operation took ~10 s in pymatgen (4 blocks x 500: 206 s)."""
    path = tmp_path / "ops.cif"
    path.write_text(F.cif_with_repeated_ops(blocks=1, sites=150, ops=192))
    _refused(path, V.UNPARSABLE, "symmetry operations x listed sites reach 28800", seconds=2.0)


def test_cif_with_many_blocks_is_refused(tmp_path):
    path = tmp_path / "blocks.cif"
    path.write_text(F.cif_with_repeated_ops(blocks=precheck.MAX_CIF_BLOCKS + 1, sites=1, ops=1))
    _refused(path, V.UNPARSABLE, f"data blocks > {precheck.MAX_CIF_BLOCKS}")


# ------------------------------------------------------------------ 5. POSCAR counts


@pytest.mark.parametrize("counts, coords", [("1", "0 0 0\n.5 .5 .5"), ("1 1", "0 0 0\n.5 .5 .5\n.25 .25 .25"), ("2 1", "0 0 0\n.5 .5 .5")])
def test_poscar_counts_must_match_the_coordinate_lines(tmp_path, counts, coords):
    """Before: counts '1' for 'Na Cl' with two coordinate lines was predicted as a 1-atom Na cell."""
    path = tmp_path / "POSCAR"
    path.write_text(f"x\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n{counts}\nDirect\n{coords}\n")
    _refused(path, V.UNPARSABLE, "coordinate lines follow")


def test_poscar_with_velocities_after_a_blank_line_is_read(tmp_path):
    path = tmp_path / "CONTCAR"
    path.write_text("x\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\nSelective dynamics\nDirect\n0 0 0 T T T\n.5 .5 .5 F F F\n\n0 0 0\n0 0 0\n")
    assert len(_read_one(path)) == 2


# ------------------------------------------------------------------ 6. folder walking


@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "good.cif").write_text((F.EXAMPLES / "Si_diamond.cif").read_text())
    (folder / "broken.cif").symlink_to(folder / "gone.cif")
    (folder / "loop.cif").symlink_to(folder / "loop.cif")
    os.mkfifo(folder / "pipe.cif")
    return folder


def test_folder_entries_that_are_not_files_each_get_a_rejection(odd_folder):
    """Before: broken links, link loops and FIFOs were skipped silently (exit 0)."""
    found = {sid: obj for sid, obj in read_structures(odd_folder)}
    assert isinstance(found.pop("good"), Structure)
    why = {Path(sid).name: (obj.reason, obj.detail) for sid, obj in found.items()}
    assert why == {
        "broken.cif": (V.UNREADABLE, "broken symbolic link (its target does not exist)"),
        "loop.cif": (V.UNREADABLE, "symbolic link loop"),
        "pipe.cif": (V.UNREADABLE, "not a regular file (a FIFO)"),
    }
    assert all(obj.source == str(odd_folder / name) for name, obj in zip(why, found.values(), strict=True))


def test_fifo_given_directly_is_not_a_regular_file(odd_folder):
    """Before: 'does not exist'; a FIFO is never opened (that would wait for a writer)."""
    got = _read_one(odd_folder / "pipe.cif")
    assert (got.reason, got.detail) == (V.UNREADABLE, "not a regular file (a FIFO)")
    with pytest.raises(ValueError, match="a FIFO"):
        load_dataset(odd_folder / "pipe.cif")
    assert _read_one(odd_folder / "absent.cif").detail == "does not exist"


def test_dataset_folder_reports_its_odd_entries(odd_folder):
    ds = load_dataset(odd_folder, require_target=False)
    assert ds.ids == ["good"]
    assert {r.id_or_path: r.reason for r in ds.rejected} == {"broken": V.UNREADABLE, "loop": V.UNREADABLE, "pipe": V.UNREADABLE}


def test_cli_prints_one_error_line_per_odd_entry(odd_folder, shipped_like, capsys):
    assert main(["predict", str(odd_folder), "--samples", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(err) == sorted([
        f"error: {odd_folder / 'broken.cif'}: unreadable: broken symbolic link (its target does not exist)",
        f"error: {odd_folder / 'loop.cif'}: unreadable: symbolic link loop",
        f"error: {odd_folder / 'pipe.cif'}: unreadable: not a regular file (a FIFO)",
    ])


# ------------------------------------------------------------------ 7. ids: escaped, unique, with their path


def test_newline_in_a_file_name_cannot_fake_an_error_line(tmp_path, shipped_like, capsys):
    """Before: 'a\\nerror: fake' in a file name printed a second, fake, error line."""
    path = tmp_path / "a\nerror: fake.cif"
    path.write_text("data_x\n")
    assert main(["predict", str(path), "--samples", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}/a\\nerror: fake.cif: unparsable"), err  # the path, escaped
    (got,) = read_structures(path)
    assert got[0] == "a\\nerror: fake" and got[1].source == str(tmp_path / "a\\nerror: fake.cif")


def test_inputs_sharing_a_stem_get_unique_ids(tmp_path):
    """Before: a/Si.cif and b/Si.cif were both 'Si' (the second rejected as a duplicate)."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "Si.cif").write_text((F.EXAMPLES / "Si_diamond.cif").read_text())
    (tmp_path / "a" / "NaCl.cif").write_text((F.EXAMPLES / "NaCl_rocksalt.cif").read_text())
    found = read_structures([tmp_path / "a", tmp_path / "b"])
    assert [sid for sid, _ in found] == ["NaCl", str(tmp_path / "a" / "Si.cif"), str(tmp_path / "b" / "Si.cif")]
    assert all(isinstance(obj, Structure) for _, obj in found)


def test_rejections_name_their_source_path(tmp_path):
    (tmp_path / "bad.cif").write_text("data_x\n")
    (tmp_path / "frames.extxyz").write_text(F.build_seeds()["extxyz"][1][1].decode() + "2\n\nNa 0 0 0\n")
    found = read_structures([tmp_path / "bad.cif", tmp_path / "frames.extxyz"])
    rejected = [obj for _, obj in found if isinstance(obj, Rejection)]
    assert [r.source for r in rejected] == [str(tmp_path / "bad.cif"), f"{tmp_path / 'frames.extxyz'}#4"]


def test_cli_error_line_names_the_path(tmp_path, shipped_like, capsys):
    (tmp_path / "bad.cif").write_text("data_x\n")
    main(["predict", str(tmp_path / "bad.cif"), "--samples", "2"])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'bad.cif'}: unparsable")


# ------------------------------------------------------------------ bounds, checked under resource limits

#: What the README's limits section states: extra address space and CPU seconds per hostile input.
MEMORY_BOUND_MB = 1024
CPU_BOUND_S = 5.0


def test_every_hostile_input_stays_within_the_stated_bounds(tmp_path):
    """Each hostile file of ``fuzz_cases.hostile_files`` is read in a child process whose address
    space is capped at its size after imports + MEMORY_BOUND_MB (RLIMIT_AS) and whose CPU time is
    capped (RLIMIT_CPU); each must end in a named rejection within CPU_BOUND_S."""
    for name, data in F.hostile_files().items():
        (tmp_path / name).write_bytes(data)
    script = REPO / "tests" / "hostile_child.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(MEMORY_BOUND_MB), str(int(4 * CPU_BOUND_S) + 10)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert set(results) == set(F.hostile_files())
    for name, (outcomes, seconds, _) in results.items():
        assert outcomes and all(o in V.REASONS for o in outcomes), (name, outcomes)
        assert seconds < CPU_BOUND_S, (name, seconds)


def test_cli_inputs_sharing_a_stem_in_two_folders_get_their_paths_as_ids(tmp_path, shipped_like, capsys):
    from pymatgen.core import Lattice, Structure

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]]).to(filename=str(tmp_path / folder / "Si.cif"))
    out = tmp_path / "out.csv"
    assert main(["predict", str(tmp_path / "a" / "Si.cif"), str(tmp_path / "b" / "Si.cif"), "--samples", "2", "--out", str(out)]) == 0
    import pandas as pd

    ids = pd.read_csv(out)["id"].tolist()
    assert len(ids) == 2 and len(set(ids)) == 2, ids
