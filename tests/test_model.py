"""BandGapModel on a tiny CHGNet: identity at init, trainable set, frozen BatchNorm, shared draws,
invariances."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_chgnet
from matbalora.adapters import adapters_of, merge_adapters, unmerge_adapters
from matbalora.config import AdapterConfig, HeadConfig
from matbalora.model import BandGapModel

TINY_TARGETS = (r"^(atom_conv_layers|bond_conv_layers|angle_layers)\.\d+\.(twoBody_atom|twoBody_bond|mlp_out)\b.*",)


def build(method: str, seed: int = 0, **adapter_kw) -> BandGapModel:
    adapter = None
    if method in ("lora", "balora"):
        adapter = AdapterConfig(rank=2, bayesian=method == "balora", targets=TINY_TARGETS, **adapter_kw)
    torch.manual_seed(seed)
    return BandGapModel(tiny_chgnet(), method=method, adapter=adapter, head=HeadConfig(hidden=8))


def graphs_of(model, structures):
    return [model.structure_to_graph(s) for s in structures]


def randomize_B(model, std=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


@pytest.mark.parametrize("method", ["lora", "balora"])
def test_adapted_model_equals_pretrained_at_init(method, crystals):
    plain = build("head")
    adapted = build(method)
    adapted.head.load_state_dict(plain.head.state_dict())
    g = graphs_of(plain, crystals)
    ref = plain(g)["gap"]
    with adapted.context.sampling("sample", torch.Generator().manual_seed(0)):
        out = adapted(g, samples=3)["gap"]
    assert torch.allclose(out, ref.expand_as(out), atol=1e-6)


def test_lora_merge_unmerge_restores_model_outputs(crystals):
    model = build("lora")
    randomize_B(model)
    g = graphs_of(model, crystals)
    before = model(g)["gap"].detach()
    assert not torch.allclose(before, build("head")(g)["gap"], atol=1e-4)
    merge_adapters(model.backbone)
    assert torch.allclose(model(g)["gap"], before, atol=1e-5)
    unmerge_adapters(model.backbone)
    assert torch.allclose(model(g)["gap"], before, atol=1e-5)


@pytest.mark.parametrize("method", ["head", "lora", "balora", "full"])
def test_one_step_changes_only_trainable_and_keeps_batchnorm(method, crystals):
    model = build(method, log_a_init=-2.0) if method == "balora" else build(method)
    if method in ("lora", "balora"):
        randomize_B(model)
    names = set(model.trainable_parameter_names())
    if method == "head":
        assert names == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    elif method in ("lora", "balora"):
        expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or ".lora_" in n or n.endswith(".log_a")}
        assert names == expected and any(n.endswith("log_a") for n in names) == (method == "balora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert any("running_mean" in n for n in buffers)  # the tiny backbone really has BatchNorm
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    g = graphs_of(model, crystals)
    with model.context.sampling("sample" if method == "balora" else "mean"):
        out = model(g)["gap"][0]
    loss = (out - torch.tensor([0.6, 5.0, 0.0, 1.8])).abs().mean() + 1e-3 * model.kl()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} drifted"


def test_per_crystal_draws_differ_between_crystals_in_a_batch(crystals):
    model = build("balora", log_a_init=0.0)
    randomize_B(model)
    g = graphs_of(model, [crystals[0], crystals[0]])
    with model.context.sampling("sample", torch.Generator().manual_seed(0)):
        out = model(g, samples=2)["gap"]
    assert not torch.isclose(out[0, 0], out[0, 1])  # same crystal twice: two different draws
    assert not torch.isclose(out[0, 0], out[1, 0])  # two samples of one crystal differ


def test_samples_tiling_equals_separate_batches(crystals):
    """S draws in one vectorised forward give the same distribution family as a batch of S copies."""
    model = build("balora", log_a_init=-0.5)
    randomize_B(model)
    g = graphs_of(model, crystals[:2])
    with model.context.sampling("sample", torch.Generator().manual_seed(3)):
        tiled = model(g, samples=4)["gap"]
    with model.context.sampling("sample", torch.Generator().manual_seed(3)):
        copies = model(g * 4, samples=1)["gap"].reshape(4, 2)
    assert torch.allclose(tiled, copies, atol=1e-5)


def _rotated(struct, seed=0):
    from scipy.spatial.transform import Rotation
    from pymatgen.core import Lattice, Structure

    rot = Rotation.random(random_state=seed).as_matrix()
    lat = Lattice(struct.lattice.matrix @ rot.T)
    return Structure(lat, struct.species, struct.frac_coords)


@pytest.mark.parametrize("transform", ["rotation", "translation", "supercell"])
def test_gap_invariant_to_rotation_translation_supercell(transform, crystals):
    model = build("balora", log_a_init=-1.0)
    randomize_B(model)
    s = crystals[3]
    if transform == "rotation":
        t = _rotated(s)
    elif transform == "translation":
        t = s.copy()
        t.translate_sites(list(range(len(t))), [0.13, -0.27, 0.41])
    else:
        t = s * (2, 1, 2)
    g = graphs_of(model, [s, t])
    det = model.sample_gaps(g, samples=0).gaps[0]
    assert abs(det[0] - det[1]) < 1e-4
    # one weight draw per crystal: sampled predictions are invariant too, under the same seed
    a = model.sample_gaps(g[:1], samples=4, seed=5).gaps[:, 0]
    b = model.sample_gaps(g[1:], samples=4, seed=5).gaps[:, 0]
    assert np.allclose(a, b, atol=1e-4)


def test_gated_head_never_negative_and_nll_has_variance(crystals):
    torch.manual_seed(0)
    model = BandGapModel(tiny_chgnet(), method="head", adapter=None, head=HeadConfig(output="gated", loss="nll"))
    with torch.no_grad():
        model.head.out.bias[0] = -20.0
    out = model(graphs_of(model, crystals))
    assert (out["gap"] >= 0).all() and "log_var" in out and "metal_logit" in out
    loss = model.head.loss({k: v[0] for k, v in out.items()}, torch.tensor([0.6, 5.0, 0.0, 1.8]))
    assert torch.isfinite(loss)


def test_method_adapter_mismatch_is_an_error():
    with pytest.raises(ValueError, match="method='lora' needs"):
        BandGapModel(tiny_chgnet(), method="lora", adapter=None, head=HeadConfig())


def test_l1_nll_head_trains_the_gap_by_l1_and_the_variance_by_nll():
    from matbalora.head import BandGapHead

    torch.manual_seed(0)
    head = BandGapHead(8, HeadConfig(hidden=8, loss="l1_nll"))
    feats, target = torch.randn(16, 8), torch.rand(16) * 3
    out = head(feats)
    assert "log_var" in out and head.has_variance
    head.loss(out, target).backward()
    g_gap = {n: p.grad.clone() for n, p in head.named_parameters()}
    l1 = BandGapHead(8, HeadConfig(hidden=8, loss="l1"))
    l1.load_state_dict({k: v[:1] if k.startswith("out.") else v for k, v in head.state_dict().items()})
    torch.nn.functional.l1_loss(l1(feats)["gap"], target).backward()
    # the gap row of the output layer gets exactly L1's gradient: the NLL term sees a detached gap
    assert torch.allclose(g_gap["out.weight"][0], l1.out.weight.grad[0], atol=1e-6)
    assert g_gap["out.weight"][1].abs().sum() > 0  # the variance row learns from the NLL term


def test_separate_variance_keeps_the_gap_and_averages_member_variances():
    from matbalora.head import BandGapHead

    torch.manual_seed(0)
    shared = BandGapHead(8, HeadConfig(hidden=8, loss="l1_nll", output="gated")).eval()
    separate = shared.with_separate_variance(3).eval()
    feats = torch.randn(5, 8)
    a, b = shared(feats), separate(feats)
    assert separate.config.variance == "separate" and separate.config.variance_members == 3
    assert torch.allclose(a["gap"], b["gap"], atol=1e-5) and torch.allclose(a["metal_logit"], b["metal_logit"], atol=1e-5)
    with torch.no_grad():
        for k, m in enumerate(separate.variance_members):  # members of log-variance 0, 1, 2 -> log of their mean variance
            m[-1].weight.zero_()
            m[-1].bias.fill_(float(k))
    assert torch.allclose(separate(feats)["log_var"], torch.full((5,), float(np.log(np.mean(np.exp([0.0, 1.0, 2.0]))))), atol=1e-5)
    with pytest.raises(ValueError, match="cannot take a separate variance"):
        BandGapHead(8, HeadConfig(hidden=8, loss="mse")).with_separate_variance(2)
    with pytest.raises(ValueError, match="variance='separate' needs"):
        HeadConfig(loss="l1", variance="separate")
    with pytest.raises(ValueError, match="variance_members=0"):
        HeadConfig(loss="nll", variance="separate", variance_members=0)


def test_separate_variance_members_can_be_smaller_than_the_gap_mlp_and_an_l1_head_takes_them():
    from matbalora.head import BandGapHead

    torch.manual_seed(0)
    l1 = BandGapHead(8, HeadConfig(hidden=32, layers=3, loss="l1", standardize=True)).eval()
    l1.set_input_statistics(torch.full((8,), 2.0), torch.full((8,), 3.0))
    separate = l1.with_separate_variance(2, hidden=4, layers=1).eval()
    cfg = separate.config
    assert (cfg.loss, cfg.variance, cfg.variance_members, cfg.variance_hidden, cfg.variance_layers) == ("l1_nll", "separate", 2, 4, 1)
    widths = [[layer.out_features for layer in m.modules() if isinstance(layer, torch.nn.Linear)] for m in separate.variance_members]
    assert widths == [[4, 1], [4, 1]]  # one hidden layer of 4, then the log-variance
    assert [layer.out_features for layer in separate.body if isinstance(layer, torch.nn.Linear)] == [32, 32, 32]
    feats = torch.randn(5, 8)
    out = separate(feats)
    assert torch.allclose(out["gap"], l1(feats)["gap"], atol=1e-6) and out["log_var"].shape == (5,)
    default = l1.with_separate_variance(1)  # 0 / -1: members of the gap MLP's size
    assert [layer.out_features for layer in default.variance_members[0].modules() if isinstance(layer, torch.nn.Linear)] == [32, 32, 32, 1]
    again = separate.with_separate_variance(3)  # a refit of a refit keeps the members' size unless told
    assert [layer.out_features for layer in again.variance_members[0].modules() if isinstance(layer, torch.nn.Linear)] == [4, 1]
    with pytest.raises(ValueError, match="variance_hidden=-1"):
        HeadConfig(loss="l1_nll", variance="separate", variance_hidden=-1)


def test_batches_fingerprint_tells_crystal_sets_apart():
    from matbalora.training import ListBatches

    a = ListBatches([object()] * 3, [0.0, 1.0, 2.0]).fingerprint()
    assert a == ListBatches([object()] * 3, [0.0, 1.0, 2.0]).fingerprint() and len(a) == 16
    assert a != ListBatches([object()] * 3, [0.0, 1.0, 2.5]).fingerprint()


def test_refit_variance_learns_where_the_noise_is_and_leaves_the_gap():
    from scipy.stats import spearmanr

    from matbalora.head import BandGapHead
    from matbalora.training import refit_variance

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=gen) * 5 + 3  # not standardised: refit_variance standardises for its members
    noise = 0.05 + 1.0 * torch.sigmoid((x[:, 0] - 3) / 2)  # eV: the noise grows with the first feature
    torch.manual_seed(0)
    head = BandGapHead(6, HeadConfig(hidden=16, loss="l1_nll")).with_separate_variance(2).eval()
    before = head(x)["gap"].detach().clone()
    y = before + noise * torch.randn(3000, generator=gen)  # gaps around the head's own: residuals are the noise
    info = refit_variance(head, (x[:2500], y[:2500]), (x[2500:], y[2500:]), epochs=15)
    assert info["members"] == 2 and len(info["val_nll_members"]) == 2 and np.isfinite(info["val_nll"])
    assert torch.equal(head(x)["gap"], before)  # the gap is untouched
    # on held-out rows the learned std follows the true noise
    std = head(x[2500:])["log_var"].detach().exp().sqrt()
    assert spearmanr(std, noise[2500:]).statistic > 0.7
    with pytest.raises(ValueError, match="variance='separate'"):
        refit_variance(BandGapHead(6, HeadConfig(hidden=4, loss="l1_nll")), (x, y), (x, y), epochs=1)


def test_refit_variance_starts_from_fresh_members_whatever_training_did_to_them():
    from matbalora.head import BandGapHead
    from matbalora.training import refit_variance

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 6, generator=gen), torch.rand(400, generator=gen) * 3
    torch.manual_seed(0)
    head = BandGapHead(6, HeadConfig(hidden=8, loss="l1_nll")).with_separate_variance(2).eval()
    diverged = copy.deepcopy(head)
    with torch.no_grad():  # as a fine-tune with a high learning rate can leave them
        for p in diverged.variance_members.parameters():
            p.fill_(50.0)
    refit_variance(head, (x[:300], y[:300]), (x[300:], y[300:]), epochs=3, seed=4)
    refit_variance(diverged, (x[:300], y[:300]), (x[300:], y[300:]), epochs=3, seed=4)
    assert torch.equal(head(x)["log_var"], diverged(x)["log_var"])


def test_out_of_fold_gaps_come_from_heads_that_did_not_see_the_crystal():
    from matbalora.head import BandGapHead
    from matbalora.training import fit_head, out_of_fold_gaps

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    y = torch.nn.functional.softplus(x[:, 0] * 2) + 0.3 * torch.rand(400, generator=gen)  # signal + noise no head can fit
    cfg = HeadConfig(hidden=64, layers=2, loss="l1", standardize=True)
    oof = out_of_fold_gaps(cfg, x, y, folds=2, epochs=60, lr=3e-3)
    torch.manual_seed(0)
    full = BandGapHead(4, cfg)
    full.set_input_statistics(x.mean(0), x.std(0))
    fit_head(full, x, y, epochs=60, lr=3e-3)
    with torch.no_grad():
        in_sample = float((full(x)["gap"] - y).abs().mean())
    out_of_fold = float((oof - y).abs().mean())
    assert oof.shape == y.shape and torch.isfinite(oof).all()
    assert out_of_fold > in_sample  # crystals a head fitted look easier than ones it did not
    assert out_of_fold < float((y - y.median()).abs().mean())  # and the fold heads still learned
    with pytest.raises(ValueError, match="folds=1"):
        out_of_fold_gaps(cfg, x, y, folds=1, epochs=1, lr=1e-3)


def test_censored_head_pulls_back_non_metals_that_softplus_leaves_at_zero():
    """A head trained on metals pushes their region of feature space to z ~ -10; insulators that then
    appear next to them get softplus's L1 gradient sigmoid(z) ~ 1e-4 and stay at 0 eV (the shipped
    head and diamond), while the censored head compares their z with the target itself and learns
    them from the same start; metals below zero cost it nothing."""
    from matbalora.head import BandGapHead
    from matbalora.training import fit_head

    gen = torch.Generator().manual_seed(0)

    def group(n: int, centre: list[float], spread: float) -> torch.Tensor:
        return torch.tensor(centre) + spread * torch.randn(n, 2, generator=gen)

    live, metals, insulators = group(300, [2.0, 0.0], 0.5), group(300, [-2.0, 0.0], 0.3), group(30, [-2.0, 1.5], 0.2)
    y_live = 1.0 + 0.5 * live[:, 0]
    torch.manual_seed(0)
    start = BandGapHead(2, HeadConfig(hidden=16, layers=2))
    fit_head(start, torch.cat([live, metals]), torch.cat([y_live, torch.zeros(300)]), epochs=100, lr=1e-2, batch_size=64)
    with torch.no_grad():
        assert float(start.gap_preactivation(insulators).max()) < -5  # a dead region
    x, y = torch.cat([live, metals, insulators]), torch.cat([y_live, torch.zeros(300), torch.full((30,), 4.0)])
    fitted = {}
    for output in ("softplus", "censored"):
        head = BandGapHead(2, HeadConfig(hidden=16, layers=2, output=output))
        head.load_state_dict(start.state_dict())
        fitted[output] = fit_head(head, x, y, epochs=100, lr=1e-2, batch_size=64)
    with torch.no_grad():
        soft, cens = fitted["softplus"](insulators)["gap"], fitted["censored"](insulators)
        assert float(soft.max()) < 0.05  # stuck: no gradient reaches them
        assert float((cens["gap"] - 4.0).abs().mean()) < 0.3 and torch.equal(cens["gap"], cens["raw"].clamp_min(0))
        assert torch.equal(cens["raw"], fitted["censored"].gap_preactivation(insulators))
        assert float(fitted["censored"](metals)["gap"].mean()) < 0.05
        assert float((fitted["censored"](live)["gap"] - y_live).abs().mean()) < 0.1
    head = BandGapHead(2, HeadConfig(hidden=4, output="censored"))
    out = {"raw": torch.tensor([-2.0, -2.0], requires_grad=True)}
    out["gap"] = out["raw"].clamp_min(0)
    head.loss(out, torch.tensor([0.0, 3.0])).backward()
    # the metal below zero: no loss, no gradient; the insulator below zero: L1's full gradient
    assert torch.equal(out["raw"].grad, torch.tensor([0.0, -0.5]))


def test_features_fingerprint_keys_the_backbone_and_adapters_not_the_head():
    """The pooled-feature cache of rehead_of is shared by models that differ only in their head."""
    from matbalora.finetune import features_fingerprint

    a, b = build("balora"), build("balora")  # the same seed: the same model
    assert features_fingerprint(a) == features_fingerprint(b)
    with torch.no_grad():
        b.head.out.bias.add_(1.0)
    assert features_fingerprint(a) == features_fingerprint(b)
    name, param = next((n, p) for n, p in b.named_parameters() if not n.startswith("head.") and p.requires_grad)
    with torch.no_grad():
        param.add_(0.5)
    assert features_fingerprint(a) != features_fingerprint(b), name


def test_gap_members_average_their_gaps_and_every_draw_of_every_member_is_a_sample(tmp_path, crystals, tiny_checkpoint):
    from matbalora.checkpoint import load_model_folder, save_model
    from matbalora.head import BandGapHead

    torch.manual_seed(0)
    config = HeadConfig(hidden=8, layers=2, output="censored", standardize=True)
    heads = [BandGapHead(8, config).eval() for _ in range(3)]
    for k, h in enumerate(heads):  # members standardise their inputs apart
        h.set_input_statistics(torch.full((8,), float(k)), torch.full((8,), 1.0 + k))
    joined = heads[0].with_separate_variance(2).with_gap_members(heads[1:]).eval()
    feats = torch.randn(5, 8)
    out = joined(feats)
    each = torch.stack([h(feats)["gap"] for h in heads])
    assert out["gap_members"].shape == (3, 5) and torch.allclose(out["gap_members"], each, atol=1e-6)
    assert torch.allclose(out["gap"], each.mean(0), atol=1e-6) and out["log_var"].shape == (5,)
    with pytest.raises(ValueError, match="not trained as one"):
        joined.loss(out, torch.ones(5))
    with pytest.raises(ValueError, match="gap member 0"):
        heads[0].with_gap_members([BandGapHead(8, HeadConfig(hidden=4))])
    with pytest.raises(ValueError, match="gap_members=0"):
        HeadConfig(gap_members=0)

    from conftest import tiny_model

    model = tiny_model("balora", tiny_checkpoint)
    graphs = graphs_of(model, crystals)
    single = model.sample_gaps(graphs, samples=4, seed=1)
    others = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        others.append(BandGapHead(model.head.in_dim, model.head.config))
    model.head = model.head.with_gap_members(others)
    model.head_config = model.head.config
    drawn = model.sample_gaps(graphs, samples=4, seed=1)
    assert drawn.gaps.shape == (12, len(graphs)) and drawn.members == 3  # 3 members x 4 draws, member-major
    assert np.array_equal(drawn.draws(1, 3), drawn.gaps[[1, 2, 5, 6, 9, 10]])  # draws 1 and 2 of every member
    assert np.array_equal(drawn.by_member()[2], drawn.gaps[8:12])  # member 2's four draws
    assert np.allclose(drawn.gaps[:4], single.gaps, atol=1e-5)  # the first member is the old head, same draws
    save_model(model, tmp_path / "m")
    again, _card = load_model_folder(tmp_path / "m")
    assert again.head.config.gap_members == 3
    assert np.allclose(again.sample_gaps(graphs, samples=4, seed=1).gaps, drawn.gaps, atol=1e-5)
    assert model.sample_gaps(graphs, samples=0).gaps.shape == (3, len(graphs))  # deterministic: the members' spread


def test_bagged_gap_heads_each_learn_from_their_own_resample_and_are_kept_apart(tmp_path, tiny_checkpoint):
    from conftest import tiny_model

    from matbalora.finetune import _fit_gap_heads

    model = tiny_model("balora", tiny_checkpoint)
    config = HeadConfig(hidden=8, layers=2, output="censored", standardize=True, pooling=model.head_config.pooling)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, model.head.in_dim, generator=gen)
    rows, val = (x, x[:, :3].sum(1).clamp_min(0)), (x[:16], x[:16, :3].sum(1).clamp_min(0))
    settings = dict(members=2, epochs=3, lr=1e-2, patience=5, seed=4)
    plain, _ = _fit_gap_heads(model, tmp_path / "run", rows, val, config, **settings)
    bagged, fits = _fit_gap_heads(model, tmp_path / "run", rows, val, config, bootstrap=True, **settings)
    assert len(list(tmp_path.glob(".gaphead_*.pt"))) == 4 and len(fits) == 2  # kept under keys of their own
    assert all(not torch.allclose(a.out.weight, b.out.weight) for a, b in zip(plain, bagged))
    again, _ = _fit_gap_heads(model, tmp_path / "run", rows, val, config, bootstrap=True, **settings)
    assert all(torch.equal(a.out.weight, b.out.weight) for a, b in zip(again, bagged))  # reused, not refitted
    assert len(list(tmp_path.glob(".gaphead_*.pt"))) == 4
    # untrained (0 epochs: the initial state is kept), each is standardised on its own resample (seed 4 + k)
    unfitted, _ = _fit_gap_heads(model, tmp_path / "run", rows, val, config, bootstrap=True, **(settings | {"epochs": 0}))
    for k, head in enumerate(unfitted):
        pick = torch.randint(64, (64,), generator=torch.Generator().manual_seed(4 + k))
        assert torch.allclose(-head.input_shift, x[pick].mean(0), atol=1e-6)
        assert not torch.allclose(-head.input_shift, x.mean(0), atol=1e-3)
