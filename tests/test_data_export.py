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
