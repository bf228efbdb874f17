"""SevenNet (equivariant) backbone: checkpoint loading without pickles, irreps-aware adapters,
rotation invariance of the gap (deterministic and with a BaLoRA draw), model folders, and a short
real fine-tune of SevenNet-0 on mp_gap crystals."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from conftest import MP_GAP, perovskite, silicon

if importlib.util.find_spec("sevenn") is None:
    if os.environ.get("MATBALORA_REQUIRE_SEVENNET"):  # CI installs the extra: a skip would hide a broken setup
        raise RuntimeError("MATBALORA_REQUIRE_SEVENNET is set but sevenn is not installed (pip install -e '.[sevennet]')")
    pytest.skip("the sevennet extra is not installed", allow_module_level=True)

pytestmark = pytest.mark.sevennet

from matbalora.adapters import adapters_of  # noqa: E402
from matbalora.backbones import sevennet  # noqa: E402
from matbalora.backbones.sevennet_adapters import IrrepsLoRA  # noqa: E402
from matbalora.config import AdapterConfig, HeadConfig  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402

SPECIES = ["H", "Li", "C", "O", "Na", "Si", "Cl", "Ti", "Sr"]


def tiny_sevennet_state(seed: int = 0) -> dict:
    """A 2-block SevenNet (8 channels, l <= 2, random weights) as a checkpoint dict; the config
    holds numpy arrays, as real SevenNet checkpoints do."""
    import sevenn
    import sevenn._const as C
    import sevenn._keys as KEY
    from ase.data import atomic_numbers
    from sevenn.checkpoint import _config_cp_routine
    from sevenn.model_build import build_E3_equivariant_model

    config = {
        **copy.deepcopy(C.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG),
        "version": sevenn.__version__,
        KEY.CUTOFF: 4.0,
        KEY.NODE_FEATURE_MULTIPLICITY: 8,
        KEY.LMAX: 2,
        KEY.IS_PARITY: False,
        KEY.NUM_CONVOLUTION: 2,
        KEY.CONVOLUTION_WEIGHT_NN_HIDDEN_NEURONS: [8],
        KEY.CONV_DENOMINATOR: [10.0, 10.0],
        KEY.SELF_CONNECTION_TYPE: "linear",
        KEY.CHEMICAL_SPECIES: SPECIES,
        KEY.NUM_SPECIES: len(SPECIES),
        KEY.TYPE_MAP: {atomic_numbers[s]: i for i, s in enumerate(SPECIES)},
        KEY.SHIFT: np.zeros(len(SPECIES), dtype=np.float32),
        KEY.SCALE: np.ones(len(SPECIES), dtype=np.float32),
        KEY.RADIAL_BASIS: {KEY.RADIAL_BASIS_NAME: "bessel", KEY.BESSEL_BASIS_NUM: 4},
        KEY.CUTOFF_FUNCTION: {KEY.CUTOFF_FUNCTION_NAME: "XPLOR", "cutoff_on": 3.5},
    }
    torch.manual_seed(seed)
    model = build_E3_equivariant_model(_config_cp_routine(copy.deepcopy(config)))
    return {"config": config, "model_state_dict": model.state_dict()}


@pytest.fixture(scope="module")
def tiny_sevennet(tmp_path_factory):
    path = tmp_path_factory.mktemp("sevennet") / "tiny_sevennet.pth"
    torch.save(tiny_sevennet_state(), path)
    return path


def make(method: str, checkpoint, *, seed: int = 0, **adapter_kw) -> BandGapModel:
    torch.manual_seed(seed)
    adapter = None
    if method in ("lora", "balora"):
        adapter = AdapterConfig(rank=2, bayesian=method == "balora", targets=sevennet.DEFAULT_TARGETS, **adapter_kw)
    return BandGapModel.from_pretrained(method, adapter=adapter, head=HeadConfig(hidden=8), checkpoint=checkpoint, backbone="sevennet")


def randomize(model: BandGapModel, *, log_a: float | None = None, seed: int = 1, scale: float = 0.5) -> BandGapModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * scale)
            if log_a is not None and hasattr(m, "log_a"):
                m.log_a.fill_(log_a)
    return model


def rotated(structure: Structure, seed: int = 3, shift=(0.3, -1.2, 0.7)) -> Structure:
    """The same crystal rotated and translated in space (Cartesian frame changes, the crystal does not)."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(random_state=seed).as_matrix()
    lattice = Lattice(structure.lattice.matrix @ rot.T)
    coords = structure.cart_coords @ rot.T + np.asarray(shift)
    return Structure(lattice, structure.species, coords, coords_are_cartesian=True)


def distorted() -> Structure:
    """A low-symmetry cell, so that l > 0 features do not cancel by symmetry."""
    return Structure(Lattice.from_parameters(4.1, 4.4, 5.2, 81, 94, 101), ["Si", "O", "Na", "Cl"],
                     [[0, 0, 0], [0.26, 0.21, 0.33], [0.5, 0.47, 0.12], [0.71, 0.83, 0.64]])


# ----------------------------------------------------------------------------- loading


def test_loads_tiny_checkpoint_through_public_api(tiny_sevennet):
    model = make("balora", tiny_sevennet)
    assert model.backbone_name == "sevennet" and model.backbone_version == "custom"
    graphs = [model.structure_to_graph(s) for s in (silicon(), distorted())]
    out = model.sample_gaps(graphs, samples=3, seed=0)
    assert out.gaps.shape == (3, 2) and np.isfinite(out.gaps).all() and (out.gaps >= 0).all()


def test_object_pickles_are_refused(tmp_path):
    state = tiny_sevennet_state()
    state["config"]["callback"] = copy.deepcopy  # a function: would be executed-on-load material
    bad = tmp_path / "evil.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="refused"):
        BandGapModel.from_pretrained("head", backbone="sevennet", checkpoint=bad)
    objects = tiny_sevennet_state()
    objects["config"]["shift"] = np.array([object()] * len(SPECIES), dtype=object)
    torch.save(objects, tmp_path / "object_array.pth")
    with pytest.raises(ValueError, match="refused"):
        sevennet.read_checkpoint(tmp_path / "object_array.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SevenNet checkpoint"):
        sevennet.read_checkpoint(tmp_path / "other.pth")


def test_unknown_backbone_and_element_are_named(tiny_sevennet):
    with pytest.raises(ValueError, match="backbone='mace'"):
        BandGapModel.from_pretrained("head", backbone="mace")
    model = make("head", tiny_sevennet)
    copper = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    with pytest.raises(ValueError, match=r"site 0 is Cu"):
        model.structure_to_graph(copper)


def test_chgnet_targets_on_sevennet_list_the_o3_linears(tiny_sevennet):
    with pytest.raises(ValueError, match="1_self_interaction_1.linear"):
        BandGapModel.from_pretrained("lora", adapter=AdapterConfig(), checkpoint=tiny_sevennet, backbone="sevennet")


# ----------------------------------------------------------------------------- adapters


def test_trainable_parameters_are_adapters_and_head(tiny_sevennet):
    model = make("balora", tiny_sevennet, last_blocks=0)
    names = model.trainable_parameter_names()
    assert names and all(n.startswith("head.") or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "log_a") for n in names)
    wrapped = [n for n, m in model.backbone.named_modules() if isinstance(m, IrrepsLoRA)]
    assert {"0_self_interaction_1.linear", "1_self_interaction_1.linear", "1_self_interaction_2.linear"} <= set(wrapped)
    assert all(n.startswith("1_") for n, m in make("lora", tiny_sevennet).backbone.named_modules() if isinstance(m, IrrepsLoRA))


def test_fresh_adapters_equal_the_pretrained_model(tiny_sevennet):
    plain = sevennet.load_sevennet(tiny_sevennet)
    model = make("lora", tiny_sevennet, last_blocks=0)
    graphs = [sevennet.structure_to_graph(plain, s) for s in (distorted(), perovskite())]
    with torch.no_grad():
        ref = sevennet.FAMILY.crystal_features(plain, graphs)
        with torch.enable_grad():  # activation-space path
            got = sevennet.FAMILY.crystal_features(model.backbone, graphs)
        folded = sevennet.FAMILY.crystal_features(model.backbone, graphs)  # no-grad folded path
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, ref, atol=1e-5, rtol=1e-5)


def test_irreps_lora_equals_the_merged_o3_linear(tiny_sevennet):
    """With random A and B, the wrapper computes e3nn's Linear with each path block W_p replaced by
    W_p + s (B A)^T / path_weight: an update inside the irreps, nothing across them."""
    model = randomize(make("lora", tiny_sevennet, last_blocks=0))
    wrapper = model.backbone.get_submodule("1_self_interaction_1.linear")
    base = wrapper.base
    weight = base.weight.detach().clone()
    for k, (ins, adapter) in enumerate(zip(base.instructions, wrapper.adapters)):
        base.weight_view_for_instruction(k, weight).add_((adapter.delta_weight().T / ins.path_weight).detach())
    x = torch.randn(5, base.irreps_in.dim)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), base(x, weight), atol=1e-5, rtol=1e-4)
        before = wrapper(x)
        for m in wrapper.adapters:
            m.merge()
        torch.testing.assert_close(wrapper(x), before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, base(x)), "random adapters should change the layer"


@pytest.mark.parametrize("bayesian", [False, True])
def test_adapted_layer_is_equivariant(tiny_sevennet, bayesian):
    from e3nn import o3

    model = randomize(make("balora" if bayesian else "lora", tiny_sevennet, last_blocks=0), log_a=-0.5)
    wrapper = model.backbone.get_submodule("1_self_interaction_1.linear")
    assert any(dim > 1 for *_, dim in wrapper.layout), "the test needs l > 0 paths"
    torch.manual_seed(0)
    rot = o3.rand_matrix()
    d_in, d_out = wrapper.irreps_in.D_from_matrix(rot), wrapper.irreps_out.D_from_matrix(rot)
    x = torch.randn(6, wrapper.irreps_in.dim)
    ctx = model.context
    for mode in ("mean", "sample"):
        outs = []
        for inp in (x, x @ d_in.T):
            ctx.owners = {f"node_{d}": torch.zeros(6 * d, dtype=torch.long) for d in (1, 3, 5)}
            ctx.n_groups = 1
            with torch.no_grad(), ctx.sampling(mode, generator=torch.Generator().manual_seed(5)):
                outs.append(wrapper(inp))
            ctx.clear_rows()
        torch.testing.assert_close(outs[1], outs[0] @ d_out.T, atol=1e-4, rtol=1e-4)


def test_per_row_noise_and_dropout_on_vectors_are_refused(tiny_sevennet):
    with pytest.raises(ValueError, match="equivariance"):
        make("balora", tiny_sevennet, noise="per_row")
    with pytest.raises(ValueError, match="equivariance"):
        make("lora", tiny_sevennet, dropout=0.1)


# ----------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("last_blocks", [1, 0])
def test_gap_is_rotation_invariant_also_per_draw(tiny_sevennet, last_blocks):
    model = randomize(make("balora", tiny_sevennet, last_blocks=last_blocks), log_a=-0.5)
    a, b = distorted(), rotated(distorted())
    ga, gb = model.structure_to_graph(a), model.structure_to_graph(b)
    mean_a, mean_b = (model.sample_gaps([g], samples=0).gaps for g in (ga, gb))
    np.testing.assert_allclose(mean_a, mean_b, atol=1e-5)
    draws_a, draws_b = (model.sample_gaps([g], samples=6, seed=11).gaps for g in (ga, gb))
    assert np.std(draws_a) > 1e-4, "draws should differ from each other"
    np.testing.assert_allclose(draws_a, draws_b, atol=1e-5)
    other_seed = model.sample_gaps([ga], samples=6, seed=12).gaps
    assert not np.allclose(draws_a, other_seed)


def test_one_draw_per_crystal_makes_supercells_agree(tiny_sevennet):
    """All atoms of a crystal share its draw, so a 2x1x1 supercell (same crystal, twice the atoms)
    gets the same sampled gap as the cell for the same seed."""
    model = randomize(make("balora", tiny_sevennet, last_blocks=0), log_a=-0.5)
    cell = distorted()
    g1, g2 = model.structure_to_graph(cell), model.structure_to_graph(cell * (2, 1, 1))
    np.testing.assert_allclose(model.sample_gaps([g1], samples=4, seed=3).gaps, model.sample_gaps([g2], samples=4, seed=3).gaps, atol=1e-5)


def test_prefix_cache_gives_the_same_features(tiny_sevennet):
    from matbalora.backbones.sevennet import FAMILY

    model = randomize(make("balora", tiny_sevennet), log_a=-0.5)
    graphs = [model.structure_to_graph(s) for s in (distorted(), silicon(), perovskite())]
    block = FAMILY.prefix_block(model.backbone, model.method)
    assert block == 1
    prefixes = FAMILY.compute_prefixes(model.backbone, graphs, block)
    for samples, seed in ((0, 0), (4, 9)):
        np.testing.assert_allclose(model.sample_gaps(prefixes, samples=samples, seed=seed).gaps,
                                   model.sample_gaps(graphs, samples=samples, seed=seed).gaps, atol=1e-5)


def test_prefix_store_holds_sevennet_prefixes(tiny_sevennet, tmp_path):
    """SevenNet prefixes in the on-disk store (fp16 features, int32 edges) give the in-memory
    prefixes' gaps, per crystal and as gathered training batches; a CHGNet reading of it is refused."""
    from matbalora.backbones.prefix_store import CorruptShardError, PrefixStore, Shard, build_prefix_store
    from matbalora.backbones.sevennet import FAMILY

    model = randomize(make("balora", tiny_sevennet), log_a=-0.5)
    structures = [distorted(), silicon(), perovskite(), rotated(distorted())]
    ids = [f"c{i}" for i in range(len(structures))]
    block = FAMILY.prefix_block(model.backbone, model.method)
    prefixes = FAMILY.compute_prefixes(model.backbone, [model.structure_to_graph(s, graph_id=i) for s, i in zip(structures, ids)], block)
    root = build_prefix_store(tmp_path / "s", ids=ids, load_shard=lambda pos: ([prefixes[p] for p in pos], [1.0] * len(pos), [ids[p] for p in pos], {}),
                              key="k", block=block, shard_size=3, family="sevennet", progress=False)
    store = PrefixStore(root)
    assert store.codec.family == "sevennet" and store.shards[0].arrays["x"].dtype == np.float16
    assert store.shards[0].arrays["edge_index"].dtype == np.int32
    with torch.no_grad():
        ref = model(prefixes, samples=1)["gap"].numpy()[0]
        per_crystal = model(store.prefix_graphs(ids), samples=1)["gap"].numpy()[0]
        batched = np.concatenate([model(store.batch(0, np.array([0, 2])), samples=1)["gap"].numpy()[0],
                                  model(store.batch(1, np.array([0])), samples=1)["gap"].numpy()[0]])
    np.testing.assert_allclose(per_crystal, ref, atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(batched, per_crystal[[0, 2, 3]], atol=1e-5)
    with pytest.raises(CorruptShardError, match="sevennet prefixes, the store says chgnet"):
        Shard(store.shard_path(0))


@pytest.mark.parametrize("variance", ["shared", "separate"])
def test_training_from_a_sevennet_store_with_the_full_pool_recipe(tiny_sevennet, tmp_path, variance):
    """The full-pool recipe on SevenNet: BaLoRA with an L1 + NLL head and mean+max pooling trained from
    store batches, head refit on pooled features, recalibration, a model folder that reloads and
    predicts structures."""
    import matbalora
    from matbalora.backbones.prefix_store import PrefixStore, StoreBatches, build_prefix_store
    from matbalora.backbones.sevennet import FAMILY
    from matbalora.config import TrainConfig
    from matbalora.data.splits import Split
    from matbalora.finetune import PreparedData, train_model

    base = [distorted(), silicon(), perovskite()]
    structures = [rotated(s, seed=k) if k % 2 else s for k in range(4) for s in base]  # 12 crystals
    targets = np.array([1.0, 0.0, 3.0] * 4)
    ids = [f"c{i}" for i in range(len(structures))]
    probe = make("balora", tiny_sevennet)
    block = FAMILY.prefix_block(probe.backbone, "balora")
    prefixes = FAMILY.compute_prefixes(probe.backbone, [probe.structure_to_graph(s, graph_id=i) for s, i in zip(structures, ids)], block)
    store = PrefixStore(build_prefix_store(tmp_path / "s", ids=ids, load_shard=lambda pos: ([prefixes[p] for p in pos], [float(targets[p]) for p in pos], [ids[p] for p in pos], {}),
                                           key="k", block=block, shard_size=4, family="sevennet", progress=False))
    held = ids[8:]
    data = PreparedData(ids=held, formulas=[s.composition.reduced_formula for s in structures[8:]], n_atoms=[len(s) for s in structures[8:]],
                        targets=store.targets(held), graphs=store.prefix_graphs(held), split=Split(np.zeros(0, np.int64), np.arange(2), np.arange(2, 4), kind="test"),
                        provenance={"source": "test"})
    cfg = TrainConfig(method="balora", epochs=2, batch_size=4, beta=0.01, kl_warmup_steps=2, head_refit_epochs=5)
    head = HeadConfig(hidden=8, loss="l1_nll", pooling="mean_max", variance=variance, variance_members=2)
    out = train_model(None, tmp_path / "model", train=cfg, head=head, data=data,
                      train_batches=StoreBatches(store, ids[:8]), samples=4, progress=False, backbone="sevennet", backbone_checkpoint=str(tiny_sevennet))
    card = json.loads((out / "config.json").read_text())
    assert card["backbone"]["name"] == "sevennet" and card["data"]["n_train"] == 8 and card["training"]["epochs_run"] == 2
    assert card["training"]["head_refit"]["val_mae_after"] <= card["training"]["head_refit"]["val_mae_before"]
    # a separate variance head's members are trained on the refitted gap's residuals after the head refit
    assert ("variance_refit" in card["training"]["head_refit"]) == (variance == "separate") and card["head"]["variance"] == variance
    df = matbalora.load_model(out).predict(structures[:2], samples=4)
    assert np.all(np.isfinite(df["band_gap"])) and np.all(df["std_aleatoric"] > 0) and np.all(df["std_epistemic"] > 0)


# ----------------------------------------------------------------------------- model folders


def test_model_folder_round_trip(tiny_sevennet, tmp_path):
    import matbalora
    from matbalora.checkpoint import ModelFolderError, load_model_folder, save_model

    model = randomize(make("balora", tiny_sevennet), log_a=-1.0)
    save_model(model, tmp_path / "m")
    card = json.loads((tmp_path / "m" / "config.json").read_text())
    assert card["backbone"]["name"] == "sevennet" and card["backbone"]["version"] == "custom"
    assert card["backbone"]["package_version"] == sevennet.sevenn_version()
    pred = matbalora.load_model(tmp_path / "m")
    assert pred.model.backbone_name == "sevennet"
    graphs = [model.structure_to_graph(s) for s in (distorted(), silicon())]
    np.testing.assert_allclose(pred.model.sample_gaps(graphs, samples=4, seed=2).gaps,
                               model.sample_gaps(graphs, samples=4, seed=2).gaps, atol=1e-6)
    df = pred.predict([distorted(), silicon()], samples=4)
    assert (df["band_gap"] >= 0).all() and (df["std"] > 0).all()
    state = tiny_sevennet_state(seed=5)  # a different backbone under the recorded path
    torch.save(state, tiny_sevennet.parent / "swapped.pth")
    card["backbone"]["checkpoint"] = str(tiny_sevennet.parent / "swapped.pth")
    (tmp_path / "m" / "config.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="differs from the one the model was trained on"):
        load_model_folder(tmp_path / "m")


def write_tiny_data(path, n: int = 24) -> None:
    """``n`` perturbed copies of ``distorted()`` with random gaps (eV), as extxyz."""
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for k in range(n):
        s = distorted().copy()
        s.perturb(0.05 + 0.01 * (k % 5))
        atoms = s.to_ase_atoms() if hasattr(s, "to_ase_atoms") else s.to_ase()
        atoms.info.update(band_gap=float(rng.uniform(0.0, 3.0)), material_id=f"tiny-{k}")
        frames.append(atoms)
    write(path, frames, format="extxyz")


def test_cli_trains_a_sevennet_ensemble(tiny_sevennet, tmp_path, capsys):
    """`matbalora train --backbone sevennet --members 2`: the data shared by the members is converted
    by SevenNet (the probe once built CHGNet graphs whatever the backbone), each member is a SevenNet
    LoRA model, and the ensemble loads and predicts rotation-invariant gaps."""
    import matbalora
    from matbalora.cli import main

    write_tiny_data(tmp_path / "tiny.extxyz")
    out = tmp_path / "ensemble"
    code = main(["train", "--data", str(tmp_path / "tiny.extxyz"), "--out", str(out), "--method", "lora", "--members", "2",
                 "--epochs", "1", "--batch-size", "8", "--rank", "2", "--samples", "0", "--backbone", "sevennet",
                 "--backbone-checkpoint", str(tiny_sevennet)])
    assert code == 0, capsys.readouterr().err
    for k in range(2):
        card = json.loads((out / f"member_{k}" / "config.json").read_text())
        assert card["backbone"]["name"] == "sevennet" and tuple(card["adapter"]["targets"]) == tuple(sevennet.DEFAULT_TARGETS)
    assert json.loads((out / "ensemble.json").read_text())["members"] == ["member_0", "member_1"]
    ensemble = matbalora.load_ensemble(out)
    assert {m.model.backbone_name for m in ensemble.members} == {"sevennet"}
    df = ensemble.predict([distorted(), rotated(distorted())])
    assert df["error"].eq("").all()
    np.testing.assert_allclose(df["band_gap"][0], df["band_gap"][1], atol=1e-4)


def test_cli_trains_a_sevennet_model_from_a_checkpoint_file(tiny_sevennet, tmp_path, capsys):
    """`matbalora train --backbone sevennet --backbone-checkpoint FILE`: adapters on SevenNet's own
    targets, a model folder that `load_model` rebuilds, recalibration in the card."""
    import matbalora
    from matbalora.cli import main

    write_tiny_data(tmp_path / "tiny.extxyz")
    out = tmp_path / "model"
    code = main(["train", "--data", str(tmp_path / "tiny.extxyz"), "--out", str(out), "--method", "balora", "--epochs", "1",
                 "--batch-size", "8", "--rank", "2", "--samples", "4", "--backbone", "sevennet", "--backbone-checkpoint", str(tiny_sevennet)])
    assert code == 0, capsys.readouterr().err
    card = json.loads((out / "config.json").read_text())
    assert card["backbone"]["name"] == "sevennet" and tuple(card["adapter"]["targets"]) == tuple(sevennet.DEFAULT_TARGETS)
    assert card["calibration"]["std_floor"] > 0
    df = matbalora.load_model(out).predict([distorted(), rotated(distorted())], samples=4)
    assert df["error"].eq("").all() and (df["std"] > 0).all()
    np.testing.assert_allclose(df["band_gap"][0], df["band_gap"][1], atol=1e-4)  # rotation-invariant through the CLI-built model


# ----------------------------------------------------------------------------- pretrained + real data


@pytest.mark.realdata
def test_short_sevennet0_finetune_on_mp_gap():
    if not MP_GAP.is_file():
        pytest.skip(f"{MP_GAP} not present")
    from matbalora.config import TrainConfig
    from matbalora.data.readers import load_dataset
    from matbalora.training import fit

    t0 = time.process_time()  # CPU seconds: the wall clock depends on what else the machine runs
    ds = load_dataset(MP_GAP, max_structures=60)
    small = [i for i, s in enumerate(ds.structures) if len(s) <= 24][:36]
    torch.manual_seed(0)
    model = BandGapModel.from_pretrained("balora", backbone="sevennet", head=HeadConfig(hidden=16))
    assert model.backbone_version == "7net-0"
    graphs = [model.structure_to_graph(ds.structures[i]) for i in small]
    y = np.asarray(ds.targets)[small]
    history = fit(model, (graphs[:28], y[:28]), (graphs[28:], y[28:]), TrainConfig(method="balora", epochs=1, batch_size=7, warmup_steps=1), progress=False)
    assert history["epoch"] == 1 and np.isfinite(history["history"][0]["val_mae"])
    assert any(float(m.lora_B.abs().sum()) > 0 for m in adapters_of(model.backbone)), "adapters were not trained"
    out = model.sample_gaps(graphs[28:], samples=4, seed=0)
    assert (out.gaps >= 0).all() and out.gaps.std(axis=0).max() > 0
    assert time.process_time() - t0 < 60


def test_sevennet0_gap_is_rotation_invariant_per_draw():
    """The wheel's SevenNet-0 with random BaLoRA adapters in every block: same gaps, draw by draw,
    for a crystal and its rotated, translated copy."""
    torch.manual_seed(0)
    model = BandGapModel.from_pretrained("balora", backbone="sevennet",
                                         adapter=AdapterConfig(rank=2, bayesian=True, targets=sevennet.DEFAULT_TARGETS, last_blocks=0))
    randomize(model, log_a=-1.0, scale=0.02)  # small: SevenNet-0's features stay in range, float32 rounding stays small
    ga, gb = model.structure_to_graph(distorted()), model.structure_to_graph(rotated(distorted(), seed=5))
    draws_a, draws_b = (model.sample_gaps([g], samples=3, seed=4).gaps for g in (ga, gb))
    assert np.std(draws_a) > 5e-4, draws_a  # draws differ by more than the tolerance below
    np.testing.assert_allclose(draws_a, draws_b, rtol=1e-4, atol=1e-4)
