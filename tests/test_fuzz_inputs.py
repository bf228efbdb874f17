"""Fuzzed inputs end in a prediction or a named rejection, within a time bound, never a crash.

Seeded subset of benchmarks/fuzz_campaign.py (same generators, tests/fuzz_cases.py): every reader
(CIF, POSCAR, extended XYZ, pymatgen JSON) on mutated real files, structure validation on arbitrary
lattices and coordinates, and regression cases for what the campaign found. Each case runs under
a CPU-time bound (SIGPROF) and an address-space cap, so a hang or a runaway allocation is a failure
here, not a stuck or swapping CI machine.
"""

from __future__ import annotations

import faulthandler
import json
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

import fuzz_cases as F
from matbalora.data import validation as V
from matbalora.data.readers import read_structures
from matbalora.predict import prepare

CASE_SECONDS = 10.0  # per case, plus 2 s per MiB of input; typical cases take 10-50 ms
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def watchdog():
    """A hang inside C code cannot be interrupted by the alarm: dump stacks and exit instead."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def seeds():
    return F.build_seeds()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def predictor(workdir):
    return F.tiny_predictor(workdir)


def assert_named(outcomes: list[str], what: str) -> None:
    """No failure (an exception, or ``failure:timeout`` past the case's time bound)."""
    failures = [o for o in outcomes if o.startswith("failure")]
    assert not failures, f"{what}: {failures}"
    assert all(o == "accepted" or o in V.REASONS for o in outcomes), outcomes


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_mutated_files_end_in_prediction_or_named_rejection(fmt, seeds, workdir, predictor):
    @FUZZ
    @given(rng=st.randoms(use_true_random=False))
    def check(rng):
        case = F.make_case(rng, seeds, fmt)
        path = F.write_case(case, workdir, 0)
        with F.memory_limit(3 << 30):
            outcomes, _ = F.run_case(path, predictor=predictor, seconds=CASE_SECONDS)
        assert_named(F.judge(case, outcomes), f"{case.seed_name} {case.ops} gz={case.gz}")

    check()


# ------------------------------------------------------------------ regressions: what the campaign found

_P = "x\n{scale}\n{lattice}\nNa Cl\n{counts}\nDirect\n{coords}\n"
_CUBE = "4 0 0\n0 4 0\n0 0 4"
_XYZ = '2\nLattice="4 0 0 0 4 0 0 0 4" Properties={props} pbc="T T T"\nNa 0 0 0\nCl 2 2 2\n'


def _fm3m_cif(n_sites: int) -> str:
    rows = "".join(
        f"O{i} O {0.013 + 0.0071 * i:.4f} {0.021 + 0.0043 * i:.4f} {0.037 + 0.0029 * i:.4f} 1\n" for i in range(n_sites)
    )
    return (
        "data_x\n_cell_length_a 50\n_cell_length_b 50\n_cell_length_c 50\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
        "_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'F m -3 m'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
        f"_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n{rows}"
    )


def _p1_cif_with_symops(n_ops: int) -> str:
    ops = "".join(f"'x+{i / 1000:.4f},y,z'\n" for i in range(n_ops))
    return _fm3m_cif(3).replace("'F m -3 m'\n", f"'P 1'\nloop_\n_symmetry_equiv_pos_as_xyz\n{ops}", 1)


REGRESSIONS = {
    # before: pymatgen's neighbour search exhausted memory (OOM-killed the process at 0.01 Å)
    "tiny_cell.vasp": (
        _P.format(scale="1.0", lattice="0.01 0 0\n0 0.01 0\n0 0 0.01", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.TOO_DENSE,
    ),
    "negative_scale.vasp": (
        _P.format(scale="-1e-30", lattice=_CUBE, counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.TOO_DENSE,
    ),
    # before: MemoryError from the neighbour search (coordinates 1e17 cells away)
    "far_site.vasp": (_P.format(scale="1.0", lattice=_CUBE, counts="1 1", coords="0 0 0\n1e17 .5 .5"), V.TOO_SPREAD),
    # before: hung for good inside pymatgen's search (its image loop counts in 32-bit integers)
    "far_single_site.vasp": ("x\n1.0\n16 0 0.3\n0 33.8 -1.9\n0 0 9\nO\n1\nDirect\n1e10 -0.3333 0.2\n", V.TOO_SPREAD),
    # before: MemoryError / "Cannot create cython.array from NULL pointer" (search grid of 1e21 cells)
    "huge_cell.vasp": (
        _P.format(scale="1.0", lattice="1e8 0 0\n0 1e8 0\n0 0 1e8", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.TOO_SPREAD,
    ),
    "huge_cell_1e100.vasp": (
        _P.format(scale="1.0", lattice="1e100 0 0\n0 1e100 0\n0 0 1e100", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.TOO_SPREAD,
    ),
    # before: pymatgen parsed a million-atom POSCAR line by line
    "million.vasp": (_P.format(scale="1.0", lattice=_CUBE, counts="1000000 0", coords="0 0 0"), V.TOO_MANY_ATOMS),
    # before: about a minute in pymatgen's symmetry expansion (19,104 atoms from 3 kB)
    "fm3m_100_sites.cif": (_fm3m_cif(100), V.TOO_MANY_ATOMS),
    # before: over two minutes (300 explicit operations x sites)
    "p1_300_symops.cif": (_p1_cif_with_symops(300), V.UNPARSABLE),
    # before: RecursionError escaped the JSON reader
    "deep.json": ("[" * 100_000 + "]" * 100_000, V.UNPARSABLE),
    "deep_object.json": ('{"a":' * 50_000 + "1" + "}" * 50_000, V.UNPARSABLE),
    # before: ASE allocated 10^8 declared columns (MemoryError after several seconds, or swapping)
    "columns.extxyz": (_XYZ.format(props="species:S:1:pos:R:3:x:R:100000000"), V.UNPARSABLE),
    "string_columns.extxyz": (_XYZ.format(props="species:S:1000000000:pos:R:3"), V.UNPARSABLE),
    # before: CHGNet's embedding raised IndexError for Z > 94, failing every row of the batch
    "americium.vasp": ("x\n1.0\n4 0 0\n0 4 0\n0 0 4\nAm Cl\n1 1\nDirect\n0 0 0\n.5 .5 .5\n", V.UNSUPPORTED_ELEMENT),
    # before: a renamed species column gave dummy atoms "X" and a failed graph conversion
    "no_species.extxyz": (_XYZ.format(props="speci%s:S:1:pos:R:3"), V.UNSUPPORTED_ELEMENT),
    # cells and numbers that were already refused, kept as fixed points
    "zero_volume.vasp": (
        _P.format(scale="1.0", lattice="0 0 0\n0 4 0\n0 0 4", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.BAD_LATTICE,
    ),
    "left_handed.vasp": (
        _P.format(scale="1.0", lattice="0 4 0\n4 0 0\n0 0 4", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.BAD_LATTICE,
    ),
    "nan_cell.vasp": (
        _P.format(scale="1.0", lattice="nan 0 0\n0 4 0\n0 0 4", counts="1 1", coords="0 0 0\n.5 .5 .5"),
        V.NON_FINITE,
    ),
    "inf_cell.json": (
        '{"lattice": {"matrix": [[1e400,0,0],[0,4,0],[0,0,4]]}, '
        '"sites": [{"species": [{"element": "Na", "occu": 1}], "abc": [0,0,0]}]}',
        V.NON_FINITE,
    ),
    "million.extxyz": ('1000000\nLattice="4 0 0 0 4 0 0 0 4"\nNa 0 0 0\n', V.UNPARSABLE),
    "empty.cif": ("", V.UNPARSABLE),
}


@pytest.mark.parametrize("name", sorted(F.hostile_files()))
def test_hostile_files_are_refused_fast(name, tmp_path):
    """Issue 18's classes: class-lookup JSON, gzip bombs, long lines, CIF work, POSCAR counts."""
    path = tmp_path / name
    path.write_bytes(F.hostile_files()[name])
    with F.memory_limit(1 << 30):
        outcomes, seconds = F.run_case(path, seconds=CASE_SECONDS)
    assert outcomes and not any(o.startswith("failure") or o == "accepted" for o in outcomes), outcomes
    assert seconds < 3.0, seconds


def test_hostile_paths_are_each_reported(tmp_path):
    """A FIFO, a broken link, a link loop and a missing path: one unreadable rejection each, alone
    or inside a folder (whose one good file is still read)."""
    *alone, folder = F.hostile_paths(tmp_path)
    for path in alone:
        assert F.run_case(path, seconds=CASE_SECONDS)[0] == [V.UNREADABLE], path
    assert sorted(F.run_case(folder, seconds=CASE_SECONDS)[0]) == ["accepted", V.UNREADABLE, V.UNREADABLE, V.UNREADABLE]


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_inputs_are_refused_fast_with_their_reason(name, tmp_path):
    text, reason = REGRESSIONS[name]
    path = tmp_path / name
    path.write_text(text)
    with F.memory_limit(2 << 30):
        outcomes, seconds = F.run_case(path, seconds=CASE_SECONDS)
    assert outcomes == [reason] and seconds < 3.0, (outcomes, seconds)


def test_unsupported_element_keeps_the_rest_of_the_batch(predictor):
    americium = Structure(Lattice.cubic(4.0), ["Am", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    salt = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    frame = predictor.predict([salt, americium, salt], samples=2)
    assert np.isfinite(frame["band_gap"][[0, 2]]).all() and np.isnan(frame["band_gap"][1])
    assert frame["error"][1].startswith(V.UNSUPPORTED_ELEMENT) and "Z=95" in frame["error"][1]


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1", "binary"])
def test_other_encodings_are_unparsable(encoding, tmp_path):
    text = (F.EXAMPLES / "NaCl_rocksalt.cif").read_text().replace("generated", "é generated")
    data = bytes(range(256)) * 8 if encoding == "binary" else text.encode(encoding)
    for suffix in (".cif", ".vasp", ".extxyz", ".json"):
        (tmp_path / f"x{suffix}").write_bytes(data)
        outcomes, seconds = F.run_case(tmp_path / f"x{suffix}", seconds=CASE_SECONDS)
        assert outcomes == [V.UNPARSABLE] and seconds < 3.0, (suffix, outcomes)


def test_cif_reading_equals_pymatgen_from_str():
    """The size check sits inside the CIF read; the structure is the one Structure.from_str builds."""
    for path in sorted(F.EXAMPLES.glob("*.cif")):
        [(sid, ours)] = read_structures(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = Structure.from_str(path.read_text(), fmt="cif")
        assert sid == path.stem and ours == theirs and type(ours) is type(theirs)


def test_symmetric_cif_within_limits_is_built(tmp_path):
    (tmp_path / "big.cif").write_text(_fm3m_cif(2))  # 2 general positions x 192 = 384 atoms
    [(_, structure)] = read_structures(tmp_path / "big.cif", min_distance=0, cutoff=0)  # only the size checks
    assert len(structure) == 384
    [(_, refused)] = read_structures(tmp_path / "big.cif", max_atoms=383, min_distance=0, cutoff=0)
    assert refused.reason == V.TOO_MANY_ATOMS and "not built" in refused.detail


# ------------------------------------------------------------------ validation on arbitrary structures

_NUMBERS = st.one_of(
    st.floats(-20, 20),
    st.sampled_from([0.0, -0.0, 1e-300, 1e-3, 1e3, 1e17, 1e100, 1e300, -1e300, math.inf, -math.inf, math.nan]),
)


@st.composite
def raw_structures(draw):
    """Lattices and coordinates with no sanity at all (pymatgen may refuse to build some), and
    half the time a plausible sheared cell, so that the deeper checks are reached too."""
    n = draw(st.integers(0, 6))
    if draw(st.booleans()):
        lattice = np.diag([draw(st.floats(0.3, 40)) for _ in range(3)])
        lattice[np.triu_indices(3, 1)] = [draw(st.floats(-3, 3)) for _ in range(3)]
        lattice = lattice.tolist()
    else:
        lattice = [[draw(_NUMBERS) for _ in range(3)] for _ in range(3)]
    coords = [[draw(st.one_of(st.floats(-2, 2), _NUMBERS)) for _ in range(3)] for _ in range(n)]
    species = [draw(st.sampled_from(["H", "O", "Na", "Cl", "Si", "Fe"])) for _ in range(n)]
    return lattice, species, coords


def test_validation_names_every_problem_and_bounds_the_graph(predictor):
    @settings(FUZZ, max_examples=300)
    @given(raw=raw_structures())
    def check(raw):
        lattice, species, coords = raw
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure(Lattice(lattice), species, coords)
        except Exception:  # not a Structure pymatgen builds; readers reject those as unparsable
            return
        start = time.process_time()
        with F.memory_limit(2 << 30), F.time_limit(CASE_SECONDS):
            found = V.check_structure(structure)
        assert time.process_time() - start < CASE_SECONDS
        if found is not None:
            assert found[0] in V.REASONS and isinstance(found[1], str) and found[1]
            return
        graph = predictor.model.structure_to_graph(structure)  # admitted: the converter works, stays small
        n_atoms = len(structure)
        assert graph.atom_graph.shape[0] <= n_atoms * (V.MAX_DENSITY * 4 / 3 * math.pi * 6.0**3 + V.LOCAL_SLACK)
        assert graph.bond_graph.shape[0] <= n_atoms * (V.MAX_DENSITY * 4 / 3 * math.pi * 3.0**3 + V.LOCAL_SLACK) ** 2

    check()


def test_dense_but_separated_cluster_is_refused_before_its_graph(predictor, monkeypatch):
    """125 atoms 0.9 Å apart in a 30 Å cell: no overlap, low mean density, but each has about 120
    neighbours within 3 Å (real crystals: at most 32), i.e. about 10^4 angles per atom."""
    grid = np.array([[i, j, k] for i in range(5) for j in range(5) for k in range(5)]) * 0.9 + 10
    cluster = Structure(Lattice.cubic(30.0), ["C"] * len(grid), grid, coords_are_cartesian=True)
    sparse = Structure(Lattice.cubic(40.0), ["C"], [[0, 0, 0]])
    fcc_squeezed = Structure.from_spacegroup("Fm-3m", Lattice.cubic(0.85), ["C"], [[0, 0, 0]])
    calls = []
    monkeypatch.setattr(predictor.model, "structure_to_graph", lambda s, graph_id=None: calls.append(s))
    prep = prepare(predictor.model, [cluster, fcc_squeezed, sparse])
    assert calls == [] and prep.graphs == []
    assert prep.errors[0].startswith(V.TOO_DENSE) and "within 3.0 Å" in prep.errors[0]
    assert prep.errors[1].startswith(V.TOO_DENSE) and "atoms/Å^3" in prep.errors[1]
    assert prep.errors[2].startswith(V.ISOLATED_ATOM)


def test_limits_accept_the_densest_real_crystals():
    """Diamond (the densest element) and a compressed hydride stay well inside the limits."""
    diamond = Structure.from_spacegroup("Fd-3m", Lattice.cubic(3.567), ["C"], [[0, 0, 0]])
    hydride = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.0), ["Li", "H"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert V.check_structure(diamond) is None and V.check_structure(hydride) is None
    assert json.dumps(V.REASONS)  # reasons stay plain strings
