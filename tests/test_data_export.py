"""The README's way to training data without ../shared: a remote source's dataset written as
extended XYZ reads back as the same crystals, ids and gaps."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_sources import fake_matbench_table

from matbalora.data.extxyz import write_extxyz
from matbalora.data.readers import load_dataset
from matbalora.data.sources import from_matbench


@pytest.mark.parametrize("name", ["train.extxyz", "train.extxyz.gz"])
def test_matbench_dataset_written_as_extxyz_reads_back(tmp_path, name):
    table = fake_matbench_table(20)
    train = from_matbench(fold=0, loader=lambda _name: table)
    assert write_extxyz(train, tmp_path / name) == len(train) > 0
    back = load_dataset(tmp_path / name)
    assert back.ids == train.ids and np.allclose(back.targets, train.targets)
    for a, b in zip(back.structures, train.structures):
        assert a.composition == b.composition and np.allclose(a.lattice.matrix, b.lattice.matrix)
        assert np.allclose(a.cart_coords, b.cart_coords, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_the_notebook_sample_can_be_drawn_from_a_file_written_from_matbench(tmp_path):
    """scripts/make_mp_gap_sample.py on a file written as the README says (Matbench ids, no
    ``matbench_index``): it keeps fold-0 test entries only, verbatim, and names a frame it cannot place."""
    import gzip
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import make_mp_gap_sample

    table = fake_matbench_table(40)
    source = tmp_path / "mixed.extxyz.gz"  # training and test rows together, as the shared file has them
    train, test = from_matbench(fold=0, loader=lambda _name: table), from_matbench(fold=0, part="test", loader=lambda _name: table)
    assert len(test) >= 2
    write_extxyz(train, tmp_path / "train.extxyz.gz")
    write_extxyz(test, tmp_path / "test.extxyz.gz")
    source.write_bytes(gzip.compress(gzip.decompress((tmp_path / "train.extxyz.gz").read_bytes()) + gzip.decompress((tmp_path / "test.extxyz.gz").read_bytes())))
    out = tmp_path / "sample" / "sample.extxyz.gz"
    make_mp_gap_sample.main(["--source", str(source), "--out", str(out), "--n", "2"])
    sample = load_dataset(out)
    assert len(sample) == 2 and set(sample.ids) <= set(test.ids)
    with pytest.raises(SystemExit, match="--n 99 must be"):
        make_mp_gap_sample.main(["--source", str(source), "--out", str(out), "--n", "99"])
    bare = tmp_path / "bare.extxyz.gz"
    bare.write_bytes(gzip.compress(b"1\nLattice=\"3 0 0 0 3 0 0 0 3\" Properties=species:S:1:pos:R:3 band_gap=1.0 pbc=\"T T T\"\nNa 0 0 0\n"))
    with pytest.raises(SystemExit, match="frame 0 has no matbench_index"):
        make_mp_gap_sample.main(["--source", str(bare), "--out", str(out), "--n", "1"])
