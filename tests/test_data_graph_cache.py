"""Graph cache: exact round trip (same CHGNet outputs), reuse, corruption recovery, workers."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from chgnet.graph import CrystalGraphConverter
from pymatgen.core import Lattice, Structure

from matbalora.data.graph_cache import GraphCache
from matbalora.data.graph_io import CorruptGraphError, graph_from_bytes, graph_to_bytes


def structures() -> list[Structure]:
    h = 5.64 / 2
    fcc = Lattice([[0, h, h], [h, 0, h], [h, h, 0]])
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    return [
        Structure(fcc, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        si,
        Structure(Lattice.cubic(5.0), ["Na"], [[0, 0, 0]]),  # no bond within 3 Å: no angles
        Structure(Lattice.from_parameters(4.1, 4.3, 6.0, 80, 95, 110), ["Ti", "O", "O"],
                  [[0.1, 0.2, 0.3], [0.4, 0.5, 0.1], [0.8, 0.7, 0.6]]),
    ]  # fmt: skip


class CountingConverter:
    """Wraps a CrystalGraphConverter and counts conversions (picklable)."""

    def __init__(self):
        self.inner = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
        self.atom_graph_cutoff, self.bond_graph_cutoff = 6, 3
        self.calls = 0

    def __call__(self, structure):
        self.calls += 1
        return self.inner(structure)


@pytest.fixture(scope="module")
def tiny_model():
    from chgnet.model import CHGNet

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet(
            atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, n_conv=2, composition_model=None, mlp_hidden_dims=[16]
        )
    return model.eval()


def assert_same_graph(a, b):
    for name, value in a.to_dict().items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and value.requires_grad == other.requires_grad, name
            assert torch.equal(value.detach(), other.detach()), name
        elif name not in ("graph_id", "mp_id"):
            assert value == other and type(value) is type(other), name


def outputs(model, graphs):
    out = model(graphs, task="e", return_crystal_feas=True, return_atom_feas=True)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def test_roundtrip_gives_identical_chgnet_outputs(tmp_path, tiny_model):
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    structs = structures()
    direct = [conv(s) for s in structs]
    assert direct[2].bond_graph.ndim == 1  # the empty-angle case is covered
    cache = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0")
    cache.graphs(structs, ids=list("abcd"), progress=False)
    cached = cache.graphs(structs, ids=list("abcd"), progress=False)  # read back from disk
    assert cache.stats.hits == 4 and cache.stats.built == 4
    assert [g.graph_id for g in cached] == list("abcd")
    for a, b in zip(direct, cached, strict=True):
        assert_same_graph(a, b)
    ref, got = outputs(tiny_model, direct), outputs(tiny_model, cached)
    assert ref.keys() == got.keys() and "crystal_fea" in ref
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.pretrained
def test_roundtrip_pretrained_outputs(tmp_path):
    from chgnet.model import CHGNet

    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False).eval()
    structs = structures()
    cache = GraphCache(tmp_path, converter=model.graph_converter, backbone_version=model.version)
    cache.graphs(structs, progress=False)
    cached = cache.graphs(structs, progress=False)
    ref = outputs(model, [model.graph_converter(s) for s in structs])
    got = outputs(model, cached)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_each_structure_converted_once(tmp_path):
    conv = CountingConverter()
    structs = structures()
    cache = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0")
    graphs = cache.graphs(structs + [structs[0].copy()], ids=["a", "b", "c", "d", "a2"], progress=False)
    assert conv.calls == 4 and graphs[4].graph_id == "a2" and graphs[0].graph_id == "a"
    assert torch.equal(graphs[4].atom_graph, graphs[0].atom_graph)
    again = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0").graphs(structs, progress=False)
    assert conv.calls == 4 and len(again) == 4
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 4 and all(f.endswith(".safetensors") and not f.startswith(".tmp") for f in files)
    other = GraphCache(tmp_path, converter=conv, backbone_version="0.3.1")  # other version: other keys
    other.graphs(structs[:1], progress=False)
    assert conv.calls == 5


def _corrupt_variants(data: bytes, graph, key: str) -> dict[str, bytes]:
    from safetensors.torch import save

    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    tensors = {k: v.detach() for k, v in graph.to_dict().items() if isinstance(v, torch.Tensor)}
    tensors["atom_frac_coord"] = tensors["atom_frac_coord"][:, :2].contiguous()
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    from matbalora.data.graph_io import _checksum

    meta["checksum"] = _checksum(tensors)  # a self-consistent file with wrong shapes
    return {"truncated": data[: len(data) // 2], "bitflip": bytes(flipped), "shape": save(tensors, metadata=meta)}


@pytest.mark.parametrize("kind", ["truncated", "bitflip", "shape"])
def test_corrupt_entry_is_rebuilt_not_used(tmp_path, kind):
    conv = CountingConverter()
    structs = structures()[:2]
    cache = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0")
    good = cache.graphs(structs, progress=False)
    path = cache.path(cache.key(structs[0]))
    original = path.read_bytes()
    bad = _corrupt_variants(original, good[0], cache.key(structs[0]))[kind]
    with pytest.raises(CorruptGraphError):
        graph_from_bytes(bad, key=cache.key(structs[0]))
    path.write_bytes(bad)
    rebuilt = cache.graphs(structs, progress=False)
    assert cache.stats.rebuilt == 1 and conv.calls == 3
    assert_same_graph(good[0], rebuilt[0])
    assert path.read_bytes() != bad  # the file was rewritten and verifies again
    assert_same_graph(good[0], graph_from_bytes(path.read_bytes(), key=cache.key(structs[0])))


def test_entry_under_wrong_key_is_rebuilt(tmp_path):
    conv = CountingConverter()
    s0, s1 = structures()[:2]
    cache = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0")
    cache.graphs([s0, s1], progress=False)
    cache.path(cache.key(s1)).write_bytes(cache.path(cache.key(s0)).read_bytes())
    g1 = cache.graphs([s1], progress=False)[0]
    assert cache.stats.rebuilt == 1 and len(g1.atomic_number) == 2 and int(g1.atomic_number[0]) == 14


def test_in_memory_mode_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conv = CountingConverter()
    cache = GraphCache(None, converter=conv, backbone_version="0.3.0")
    first = cache.graphs(structures(), progress=False)
    second = cache.graphs(structures(), progress=False)
    assert conv.calls == 4 and cache.stats.hits == 4 and cache.path("ab") is None
    assert list(tmp_path.iterdir()) == []
    for a, b in zip(first, second, strict=True):
        assert_same_graph(a, b)


def test_workers_match_serial(tmp_path):
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    structs = structures()
    serial = GraphCache(None, converter=conv, backbone_version="0.3.0").graphs(structs, progress=False)
    pooled = GraphCache(tmp_path, converter=conv, backbone_version="0.3.0").graphs(structs, workers=2, progress=False)
    for a, b in zip(serial, pooled, strict=True):
        assert_same_graph(a, b)


def test_conversion_failure_names_entry():
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    lonely = Structure(Lattice.cubic(7.0), ["Na"], [[0, 0, 0]])
    with pytest.raises(ValueError, match="entry lonely-1"):
        GraphCache(None, converter=conv, backbone_version="0.3.0").graphs([lonely], ids=["lonely-1"], progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="atom_graph_cutoff"):
        GraphCache(None, converter=lambda s: s, backbone_version="0.3.0")
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    cache = GraphCache(None, converter=conv, backbone_version="0.3.0")
    with pytest.raises(ValueError, match="workers=0"):
        cache.graphs(structures(), workers=0)
    with pytest.raises(ValueError, match="2 ids for 4"):
        cache.graphs(structures(), ids=["a", "b"])
    graph = conv(structures()[0])
    data = graph_to_bytes(graph, key="k1", backbone_version="0.3.0")
    with pytest.raises(CorruptGraphError, match="backbone version"):
        graph_from_bytes(data, key="k1", backbone_version="0.2.0")
