"""Materials Project and Matbench sources, with fake clients (no network)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from matbalora.data.sources import from_matbench, from_materials_project, matbench_id
from matbalora.data.splits import matbench_fold_ids, matbench_index_from_ids
from matbalora.data.validation import ISOLATED_ATOM, MISSING_TARGET


def rocksalt(a: float, species=("Na", "Cl")) -> Structure:
    h = a / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def make_doc(material_id, structure, band_gap, is_metal=False, e_hull=0.0):
    """A document shaped like mp-api's SummaryDoc (attribute access; MPID-typed id when available)."""
    try:
        from emmet.core.mpid import MPID
        from emmet.core.summary import SummaryDoc

        return SummaryDoc.model_construct(
            material_id=MPID(material_id), structure=structure, band_gap=band_gap,
            is_metal=is_metal, energy_above_hull=e_hull,
        )  # fmt: skip
    except ImportError:
        return SimpleNamespace(
            material_id=material_id, structure=structure, band_gap=band_gap, is_metal=is_metal, energy_above_hull=e_hull
        )


class FakeRester:
    """Mimics ``MPRester(api_key)``: context manager with ``.materials.summary.search``."""

    def __init__(self, api_key, docs, log):
        self.api_key, self.log = api_key, log
        self.materials = SimpleNamespace(summary=SimpleNamespace(search=self.search))
        self.docs = docs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def search(self, **kwargs):
        self.log.append(kwargs)
        return list(self.docs)


@pytest.fixture
def fake_mp():
    calls: list[dict] = []
    docs = [
        make_doc("mp-22862", rocksalt(5.64), 5.0),
        make_doc("mp-23193", rocksalt(6.29, ("K", "Cl")), 5.1),
        make_doc("mp-30", rocksalt(3.6, ("Cu", "Cu")), None, is_metal=True),
        make_doc("mp-999", Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]]), 1.0),
        make_doc("mp-1000", rocksalt(5.0, ("Mg", "O")), None, is_metal=False),
    ]
    return calls, (lambda key: FakeRester(key, docs, calls))


def test_mp_search_and_cache(tmp_path, fake_mp, monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    calls, factory = fake_mp
    kwargs = dict(elements=["Cl", "Na"], num_sites=(1, 20), energy_above_hull_max=0.1, cache_dir=tmp_path)
    ds = from_materials_project(api_key="secret-key", client_factory=factory, **kwargs)
    assert len(calls) == 1
    assert calls[0]["fields"] == ["material_id", "structure", "band_gap", "is_metal", "energy_above_hull"]
    assert calls[0]["elements"] == ["Cl", "Na"] and calls[0]["num_sites"] == (1, 20)
    assert calls[0]["energy_above_hull"] == (0.0, 0.1)
    assert ds.ids == ["mp-22862", "mp-23193", "mp-30"]
    np.testing.assert_allclose(ds.targets, [5.0, 5.1, 0.0])  # the metal without a gap counts as 0 eV
    assert {r.id_or_path: r.reason for r in ds.rejected} == {"mp-999": ISOLATED_ATOM, "mp-1000": MISSING_TARGET}
    (cache_file,) = tmp_path.iterdir()
    assert "secret-key" not in cache_file.read_text()
    # second call: same query, served from the cache, no key needed, no request
    again = from_materials_project(client_factory=factory, **kwargs)
    assert len(calls) == 1 and again.ids == ds.ids
    assert [s.composition for s in again.structures] == [s.composition for s in ds.structures]
    assert again.provenance["query"]["elements"] == ["Cl", "Na"] and again.provenance["retrieved"]
    # a different query is a different cache entry
    from_materials_project(api_key="k", client_factory=factory, elements=["Na"], cache_dir=tmp_path)
    assert len(calls) == 2 and "elements" in calls[1] and "num_sites" not in calls[1]
    from_materials_project(api_key="k", client_factory=factory, refresh=True, **kwargs)
    assert len(calls) == 3


def test_mp_api_key_from_env_or_error(tmp_path, fake_mp, monkeypatch):
    calls, factory = fake_mp
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(ValueError, match="MP_API_KEY"):
        from_materials_project(client_factory=factory, cache_dir=tmp_path)
    assert calls == []
    monkeypatch.setenv("MP_API_KEY", "env-key")
    keys = []
    from_materials_project(client_factory=lambda k: keys.append(k) or factory(k), cache_dir=tmp_path)
    assert keys == ["env-key"]


def test_mp_bad_queries_named(tmp_path):
    with pytest.raises(ValueError, match="Qq"):
        from_materials_project(api_key="k", elements=["Na", "Qq"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_sites"):
        from_materials_project(api_key="k", num_sites=(5, 2), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="energy_above_hull_max"):
        from_materials_project(api_key="k", energy_above_hull_max=-1, cache_dir=tmp_path)


def test_mp_corrupt_cache_refetches(tmp_path, fake_mp):
    calls, factory = fake_mp
    from_materials_project(api_key="k", client_factory=factory, cache_dir=tmp_path)
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_text(cache_file.read_text()[:100])
    from_materials_project(api_key="k", client_factory=factory, cache_dir=tmp_path)
    assert len(calls) == 2 and json.loads(cache_file.read_text())["records"]


def fake_matbench_table(n: int = 20) -> pd.DataFrame:
    rows = [rocksalt(5.0 + 0.05 * i) for i in range(n)]
    gaps = [0.1 * i for i in range(n)]
    rows[3] = Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]])  # rejected: isolated atom
    return pd.DataFrame({"structure": rows, "gap pbe": gaps})


def test_matbench_all_and_folds():
    names = []

    def loader(name):
        names.append(name)
        return fake_matbench_table()

    full = from_matbench(loader=loader)
    assert names == ["matbench_mp_gap"] and len(full) == 19
    assert full.ids[:2] == ["mb-mp-gap-01", "mb-mp-gap-02"] and full.rejected[0].id_or_path == "mb-mp-gap-04"
    np.testing.assert_allclose(full.targets[:3], [0.0, 0.1, 0.2])
    folds = matbench_fold_ids(20)
    test = from_matbench(fold=1, part="test", loader=loader)
    train = from_matbench(fold=1, loader=loader)
    rows = matbench_index_from_ids(test.ids)
    assert (folds[rows] == 1).all() and (folds[matbench_index_from_ids(train.ids)] != 1).all()
    assert len(test) + len(train) == 19 and test.provenance["part"] == "test"
    assert matbench_id(0, 106_113) == "mb-mp-gap-000001"
    with pytest.raises(ValueError, match="lacks columns"):
        from_matbench(loader=lambda name: pd.DataFrame({"structure": []}))
    with pytest.raises(ValueError, match="fold=7"):
        from_matbench(fold=7, loader=loader)
