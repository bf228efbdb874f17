"""Model folders: exact round trip, SHA-256 check, version check, no pickles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model, toy_set
from matbalora.adapters import adapters_of
from matbalora.checkpoint import ModelFolderError, load_model_folder, save_model


def _trained_balora(ckpt):
    model = tiny_model("balora", ckpt, log_a_init=-1.0)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen))
    return model


def test_save_load_reproduces_predictions(tiny_checkpoint, tmp_path):
    model = _trained_balora(tiny_checkpoint)
    graphs = [model.structure_to_graph(s) for s in toy_set(4)[0]]
    det = model.sample_gaps(graphs, samples=0).gaps
    sampled = model.sample_gaps(graphs, samples=8, seed=11).gaps
    assert sampled.std(0).min() > 0  # really stochastic
    save_model(model, tmp_path / "m", extra={"metrics": {"note": "test"}})
    loaded, config = load_model_folder(tmp_path / "m")
    assert np.array_equal(loaded.sample_gaps(graphs, samples=0).gaps, det)
    assert np.allclose(loaded.sample_gaps(graphs, samples=8, seed=11).gaps, sampled, atol=1e-7)
    assert config["method"] == "balora" and config["backbone"]["version"] == "tiny-test"
    assert config["metrics"] == {"note": "test"}
    saved = set(json.loads((tmp_path / "m" / "config.json").read_text())["weights"])
    assert saved == {"model.safetensors"}


def test_only_trained_weights_are_saved(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    save_model(_trained_balora(tiny_checkpoint), tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert keys and all(k.startswith("head.") or ".lora_" in k or k.endswith("log_a") for k in keys)


def test_tampered_or_truncated_weights_are_refused(tiny_checkpoint, tmp_path):
    save_model(_trained_balora(tiny_checkpoint), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="model.safetensors: SHA-256"):
        load_model_folder(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ModelFolderError, match="missing weight file"):
        load_model_folder(tmp_path / "m")


def test_backbone_version_mismatch_is_refused(tiny_checkpoint, tmp_path):
    save_model(_trained_balora(tiny_checkpoint), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["backbone"]["version"] = "0.2.0"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="trained on backbone chgnet '0.2.0'.*'tiny-test'"):
        load_model_folder(tmp_path / "m")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="config.json: missing"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_model_folder(tmp_path)


@pytest.mark.pretrained
def test_pretrained_chgnet_with_adapters_equals_pretrained(crystals):
    from matbalora.adapters import select_targets
    from matbalora.backbones.chgnet import load_chgnet
    from matbalora.config import AdapterConfig
    from matbalora.model import BandGapModel

    plain = BandGapModel.from_pretrained("head")
    assert plain.backbone_version == "0.3.0"
    for method in ("lora", "balora"):
        adapted = BandGapModel.from_pretrained(method)
        adapted.head.load_state_dict(plain.head.state_dict())
        g = [plain.structure_to_graph(s) for s in crystals]
        with adapted.context.sampling("sample", torch.Generator().manual_seed(0)):
            out = adapted(g, samples=2)["gap"]
        assert torch.allclose(out, plain(g)["gap"].expand_as(out), atol=1e-6)
        # default targets: the message-passing linears of the last block (41 in every block with last_blocks=0)
        paths = [n for n, m in adapted.backbone.named_modules() if hasattr(m, "lora_A")]
        assert len(paths) == 5 and all(p.startswith("atom_conv_layers.3.") for p in paths)
    every = select_targets(load_chgnet(), AdapterConfig(last_blocks=0))
    assert len(every) == 41 and all(p.split(".")[0] in ("atom_conv_layers", "bond_conv_layers", "angle_layers") for p in every)


def test_folder_without_last_blocks_loads_adapters_in_every_block(tiny_checkpoint, tmp_path, crystals):
    """Model folders written before ``last_blocks`` existed adapted every matched block."""
    model = tiny_model("lora", tiny_checkpoint, last_blocks=0)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.normal_(0, 0.1)
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["adapter"]["last_blocks"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _card = load_model_folder(tmp_path)
    assert {n for n, _ in loaded.backbone.named_modules() if hasattr(_, "lora_A")} == {n for n, _ in model.backbone.named_modules() if hasattr(_, "lora_A")}
    g = [model.structure_to_graph(s) for s in crystals]
    np.testing.assert_array_equal(loaded.sample_gaps(g, samples=0).gaps, model.sample_gaps(g, samples=0).gaps)


def test_widened_adapters_keep_the_trained_model_and_add_zero_updates(tiny_checkpoint, tmp_path, crystals):
    """``with_adapters`` (a warm start into more blocks): the trained tensors carried over, the added
    adapters at B = 0, so the widened model predicts what the folder's model predicts."""
    from matbalora.checkpoint import with_adapters
    from matbalora.config import AdapterConfig

    model = _trained_balora(tiny_checkpoint)
    save_model(model, tmp_path / "m")
    loaded, _ = load_model_folder(tmp_path / "m")
    wide = with_adapters(loaded, AdapterConfig(rank=2, bayesian=True, log_a_init=-1.0, last_blocks=2))
    old, new = {n for n, m in loaded.backbone.named_modules() if hasattr(m, "lora_A")}, {n for n, m in wide.backbone.named_modules() if hasattr(m, "lora_A")}
    assert old < new
    added = dict(wide.backbone.named_modules())
    assert all(float(added[n].lora_B.detach().abs().max()) == 0 for n in new - old)
    g = [model.structure_to_graph(s) for s in crystals]
    np.testing.assert_allclose(wide.sample_gaps(g, samples=0).gaps, model.sample_gaps(g, samples=0).gaps, atol=1e-6)
    with pytest.raises(ValueError, match="keeps the method"):
        with_adapters(loaded, AdapterConfig(rank=2, bayesian=False, last_blocks=2))
    with pytest.raises(ValueError, match="would change shape"):
        with_adapters(loaded, AdapterConfig(rank=4, bayesian=True, last_blocks=2))
    with pytest.raises(ValueError, match="no place for trained tensors"):
        with_adapters(wide, AdapterConfig(rank=2, bayesian=True, last_blocks=1))
