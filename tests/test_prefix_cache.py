"""Cached frozen-prefix features give the same model outputs as the full forward, and are refused
where they would be stale (adapters or trainable weights before the cached block)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from matbalora.backbones.chgnet import FAMILY as CHGNET
from matbalora.backbones.chgnet import PrefixGraph
from matbalora.config import AdapterConfig, HeadConfig
from matbalora.model import BandGapModel


def three_block_chgnet(seed: int = 0):
    from chgnet.model import CHGNet

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet(atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, num_radial=7, num_angular=7, n_conv=3,
                       composition_model=None, mlp_hidden_dims=[16], gMLP_norm="batch", version="tiny-test")
    return model.eval()


def late_model(method: str, first_block: int, **kw) -> BandGapModel:
    targets = (rf"^(atom_conv_layers|bond_conv_layers|angle_layers)\.[{first_block}-9]\.(twoBody_atom|twoBody_bond|mlp_out)\b.*",)
    adapter = AdapterConfig(bayesian=method == "balora", targets=targets, last_blocks=0, log_a_init=-2.0, **kw) if method != "head" else None
    model = BandGapModel(three_block_chgnet(), method=method, adapter=adapter, head=HeadConfig(hidden=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def graphs_of(model, structures):
    return [model.structure_to_graph(s, graph_id=str(i)) for i, s in enumerate(structures)]


@pytest.mark.parametrize("first_block", [1, 2])  # block 1 keeps angle features, block 2 (last) does not
@pytest.mark.parametrize("method", ["lora", "balora"])
def test_prefix_forward_equals_full_forward(method, first_block, crystals):
    model = late_model(method, first_block)
    graphs = graphs_of(model, crystals)
    block = CHGNET.prefix_block(model.backbone, method)
    assert block == first_block
    prefixes = CHGNET.compute_prefixes(model.backbone, graphs, block, batch_size=3, progress=False)  # batches split crystals
    assert all(isinstance(p, PrefixGraph) for p in prefixes) and (prefixes[0].angle is None) == (block == 2)
    det_full = model.sample_gaps(graphs, samples=0).gaps
    det_pref = model.sample_gaps(prefixes, samples=0).gaps
    np.testing.assert_allclose(det_pref, det_full, rtol=1e-5, atol=1e-6)
    if method == "balora":  # same seed, same passes -> the same per-crystal draws
        s_full = model.sample_gaps(graphs, samples=8, seed=3).gaps
        s_pref = model.sample_gaps(prefixes, samples=8, seed=3).gaps
        np.testing.assert_allclose(s_pref, s_full, rtol=1e-5, atol=1e-6)
        assert s_full.std(0).min() > 0


def test_prefix_training_step_matches_full_graph_step(crystals):
    torch.manual_seed(0)
    a, b = late_model("lora", 2), late_model("lora", 2)
    b.load_state_dict(a.state_dict())
    graphs = graphs_of(a, crystals)
    prefixes = CHGNET.compute_prefixes(a.backbone, graphs, 2, progress=False)
    y = torch.tensor([1.1, 5.0, 0.0, 1.8])
    grads = []
    for model, batch in ((a, graphs), (b, prefixes)):
        model.train()
        loss = model.head.loss({k: v[0] for k, v in model(batch).items()}, y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_prefix_is_refused_where_features_would_go_stale(crystals):
    model = late_model("lora", 1)
    graphs = graphs_of(model, crystals[:2])
    with pytest.raises(ValueError, match="first adapted block"):
        CHGNET.compute_prefixes(model.backbone, graphs, 2, progress=False)
    prefixes = CHGNET.compute_prefixes(late_model("lora", 2).backbone, graphs, 2, progress=False)
    with pytest.raises(ValueError, match="cached up to block 2"):
        model.sample_gaps(prefixes, samples=0)
    full = BandGapModel(three_block_chgnet(), method="full", adapter=None, head=HeadConfig(hidden=8))
    assert CHGNET.prefix_block(full.backbone, "full") == 0
    with pytest.raises(ValueError, match="trainable"):
        CHGNET.compute_prefixes(full.backbone, graphs, 1, progress=False)
