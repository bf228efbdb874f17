"""Fast prediction: passes sized by rows (atoms + bonds + angles), folded adapters, batched draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import perovskite, rocksalt_nacl, silicon, tiny_chgnet
from matbalora.adapters import BaLoRALinear, LoRALinear, adapters_of
from matbalora.noise_context import NoiseContext
from matbalora.backbones.chgnet import FAMILY as CHGNET
from matbalora.config import AdapterConfig, HeadConfig
from matbalora.model import BandGapModel, Pass, plan_passes


def build(method: str = "balora", **adapter_kw) -> BandGapModel:
    torch.manual_seed(0)
    adapter = AdapterConfig(rank=2, bayesian=method == "balora", **adapter_kw) if method != "head" else None
    model = BandGapModel(tiny_chgnet(), method=method, adapter=adapter, head=HeadConfig(hidden=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
            if isinstance(m, BaLoRALinear):
                m.log_a.fill_(-1.0)
    return model


def graphs_of(model, structures):
    return [model.structure_to_graph(s, graph_id=str(i)) for i, s in enumerate(structures)]


def test_plan_passes_keeps_order_and_budget():
    rows = [10, 20, 30, 5, 5, 100, 1]
    passes = plan_passes(rows, draws=2, max_rows=80, max_crystals=3)
    covered = [i for p in passes for i in range(p.start, p.stop) for _ in range(p.draws)]
    assert covered == [i for i in range(len(rows)) for _ in range(2)]  # every crystal, every draw, in order
    for p in passes:
        assert p.stop - p.start <= 3
        assert sum(rows[p.start : p.stop]) * p.draws <= 80 or (p.stop - p.start, p.draws) == (1, 1)
    # crystal 5 (100 rows) cannot hold 2 draws in 80 rows, nor one: it runs alone, one draw per pass
    assert [p for p in passes if p.start == 5] == [Pass(5, 6, 1), Pass(5, 6, 1)]


def test_plan_passes_splits_draws_of_a_large_crystal():
    passes = plan_passes([1000], draws=16, max_rows=4500, max_crystals=64)
    assert [p.draws for p in passes] == [4, 4, 4, 4] and all((p.start, p.stop) == (0, 1) for p in passes)
    assert plan_passes([], draws=4, max_rows=10, max_crystals=2) == []
    with pytest.raises(ValueError, match="max_rows=0"):
        plan_passes([1], draws=1, max_rows=0, max_crystals=1)


def test_row_budget_changes_passes_not_the_deterministic_gaps(crystals):
    model = build()
    graphs = graphs_of(model, crystals + [perovskite() * (2, 2, 1)])
    one = model.sample_gaps(graphs, samples=0).gaps
    small = model.sample_gaps(graphs, samples=0, max_rows=min(CHGNET.graph_rows(g) for g in graphs)).gaps
    assert np.allclose(one, small, atol=1e-5)


def test_large_crystal_draws_stay_within_the_row_budget(crystals, monkeypatch):
    model = build()
    big = rocksalt_nacl() * (2, 2, 2)  # 64 atoms
    graphs = graphs_of(model, [silicon(), big, crystals[3]])
    budget = CHGNET.graph_rows(graphs[1]) * 3  # 3 draws of the big crystal per pass
    seen = []
    forward = BandGapModel.forward

    def spy(self, chunk, *, samples=1):
        seen.append(sum(CHGNET.graph_rows(g) for g in chunk) * samples)
        return forward(self, chunk, samples=samples)

    monkeypatch.setattr(BandGapModel, "forward", spy)
    draws = model.sample_gaps(graphs, samples=8, seed=0, max_rows=budget)
    assert draws.gaps.shape == (8, 3) and np.isfinite(draws.gaps).all()
    assert max(seen) <= budget and len(seen) >= 4  # the big crystal's 8 draws need 3 passes
    assert np.unique(draws.gaps[:, 1].round(6)).size == 8  # every draw is a different network
    again = model.sample_gaps(graphs, samples=8, seed=0, max_rows=budget).gaps
    assert np.array_equal(draws.gaps, again)


@pytest.mark.parametrize("method", ["lora", "balora"])
def test_folded_forward_equals_activation_space_forward(method, crystals):
    """Without autograd the update is folded into the weight; with autograd it is not: same output."""
    model = build(method)
    graphs = graphs_of(model, crystals)
    with torch.no_grad():
        folded = model(graphs, samples=1)["gap"]
    with torch.enable_grad():
        plain = model(graphs, samples=1)["gap"].detach()
    assert torch.allclose(folded, plain, atol=1e-5)
    if method == "balora":  # per-crystal draws: the same random numbers in both paths
        for grad in (False, True):
            with torch.set_grad_enabled(grad), model.context.sampling("sample", torch.Generator().manual_seed(4)):
                out = model(graphs, samples=5)["gap"].detach()
            if not grad:
                folded_draws = out
        assert torch.allclose(folded_draws, out, atol=1e-5)
        assert folded_draws.std(0).min() > 0


def test_tiled_segments_give_the_same_draws_as_group_owners():
    """The batched per-crystal matmul (segments) and the per-group loop (owners) agree exactly in law
    and in the random numbers they use."""
    cfg = AdapterConfig(rank=3, bayesian=True, log_a_init=0.0)
    ctx = NoiseContext()
    layer = BaLoRALinear(torch.nn.Linear(6, 4), cfg, ctx)
    layer.row_kind = "atom"
    counts, tiles = [2, 0, 3], 4
    x = torch.randn(tiles * sum(counts), 6)
    owners = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    owners = torch.cat([owners + s * len(counts) for s in range(tiles)])
    ctx.owners, ctx.n_groups = {"atom": owners}, tiles * len(counts)
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        by_owner = layer.low_rank(x)
    ctx.segments, ctx.tiles = {"atom": counts}, tiles
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        by_segment = layer.low_rank(x)
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        folded = layer(x)  # one sampled weight per (sample, crystal), the same random numbers
    assert torch.allclose(by_owner, by_segment, atol=1e-6)
    assert torch.allclose(folded, layer.base(x) + layer.scale * by_segment @ layer.lora_B.T, atol=1e-6)
    with pytest.raises(RuntimeError, match="cover 4 x 5 rows"), ctx.sampling("sample"):
        layer.low_rank(x[:-1])


def test_lora_fold_is_exact_at_init_and_skipped_with_active_dropout():
    base = torch.nn.Linear(5, 3)
    layer = LoRALinear(base, AdapterConfig(rank=2, dropout=0.5))
    x = torch.randn(7, 5)
    layer.eval()
    with torch.no_grad():
        assert layer.foldable() and torch.equal(layer(x), base(x))  # B = 0: the folded weight is W0
        layer.train()  # MC dropout on the adapter input cannot be folded into a weight
        assert not layer.foldable()
    assert not layer.foldable() and (layer.eval() is layer) and not layer.foldable()  # autograd on


def test_max_atoms_reaches_prediction_and_screening(tiny_model_dirs):
    import matbalora
    from matbalora.predict import Predictor

    big = rocksalt_nacl() * (2, 2, 2)  # 64 atoms
    frame = Predictor(build()).predict([silicon(), big], samples=2, max_atoms=10)
    assert frame["error"].tolist()[0] == "" and frame["error"].tolist()[1].startswith("too_many_atoms")
    screened = matbalora.screen([silicon(), big], model=str(tiny_model_dirs / "balora"), samples=2, max_atoms=100, progress=False)
    assert (screened["error"] == "").all() and screened["band_gap"].notna().all()
