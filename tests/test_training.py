"""Fine-tuning loop: learns, checkpoints every epoch, resumes to the same result, stops on NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import matbalora.training as training
from conftest import tiny_model, toy_set
from matbalora.config import TrainConfig
from matbalora.training import TrainingDiverged, fit


def _data(model, n=12):
    structs, gaps = toy_set(n)
    graphs = [model.structure_to_graph(s) for s in structs]
    return (graphs[:8], gaps[:8]), (graphs[8:], gaps[8:])


@pytest.mark.parametrize("method", ["head", "balora"])
def test_training_reduces_validation_error(method, tiny_checkpoint):
    model = tiny_model(method, tiny_checkpoint)
    train, val = _data(model)
    before = training.validation_mae(model, *val)
    hist = fit(model, train, val, TrainConfig(method=method, epochs=6, batch_size=4, lr=1e-2, warmup_steps=1, patience=6), progress=False)
    assert hist["best_val_mae"] < before
    assert len(hist["history"]) == 6 and all(np.isfinite(e["train_loss"]) for e in hist["history"])
    if method == "balora":
        assert all(e["kl"] > 0 for e in hist["history"])


def test_resume_after_interruption_matches_uninterrupted_run(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = TrainConfig(method="balora", epochs=3, batch_size=4, lr=5e-3, warmup_steps=1, patience=3, seed=3)
    ref_model = tiny_model("balora", tiny_checkpoint)
    train, val = _data(ref_model)
    ref = fit(ref_model, train, val, cfg, out_dir=tmp_path / "ref", progress=False)

    model = tiny_model("balora", tiny_checkpoint)
    real_val = training.validation_mae
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during epoch 2, after epoch 1's checkpoint
        return real_val(*args, **kwargs)

    monkeypatch.setattr(training, "validation_mae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, val, cfg, out_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(training, "validation_mae", real_val)
    with pytest.raises(FileExistsError):
        fit(tiny_model("balora", tiny_checkpoint), train, val, cfg, out_dir=tmp_path / "run", progress=False)
    resumed_model = tiny_model("balora", tiny_checkpoint, seed=99)  # different init: state must come from disk
    res = fit(resumed_model, train, val, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    assert [e["val_mae"] for e in res["history"]] == pytest.approx([e["val_mae"] for e in ref["history"]], abs=1e-6)
    for (n1, p1), (n2, p2) in zip(ref_model.named_parameters(), resumed_model.named_parameters()):
        if p1.requires_grad:
            assert torch.allclose(p1, p2, atol=1e-6), n1


def test_nan_loss_stops_with_clear_message(tiny_checkpoint, tmp_path):
    model = tiny_model("lora", tiny_checkpoint)
    train, val = _data(model)
    bad = (train[0], np.full(len(train[1]), np.nan))
    with pytest.raises(TrainingDiverged, match="not finite"):
        fit(model, bad, val, TrainConfig(method="lora", epochs=1, batch_size=4), out_dir=tmp_path, progress=False)


def test_method_mismatch_is_an_error(tiny_checkpoint):
    model = tiny_model("lora", tiny_checkpoint)
    train, val = _data(model)
    with pytest.raises(ValueError, match="method"):
        fit(model, train, val, TrainConfig(method="balora", epochs=1), progress=False)


def test_standardized_head_input_is_set_from_training_features_and_saved(tiny_checkpoint, tmp_path):
    """HeadConfig(standardize=True): before the first step the head z-scores the pooled features with
    the training crystals' statistics; they travel with the model folder."""
    import matbalora
    from matbalora.checkpoint import save_model
    from matbalora.config import AdapterConfig, HeadConfig
    from matbalora.model import BandGapModel

    torch.manual_seed(0)
    model = BandGapModel.from_pretrained("balora", adapter=AdapterConfig(rank=2, bayesian=True), head=HeadConfig(hidden=8, standardize=True),
                                         checkpoint=tiny_checkpoint)
    train, val = _data(model)
    training.set_head_statistics(model, train[0])
    with torch.no_grad(), model.context.sampling("mean"):
        feats = model.family.crystal_features(model.backbone, train[0], context=model.context)[0]
        z = (feats + model.head.input_shift) * model.head.input_scale
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0).numpy()[feats.std(0).numpy() > 1e-6], 1.0, atol=1e-3)
    fit(model, train, val, TrainConfig(method="balora", epochs=1, batch_size=4, warmup_steps=1, patience=1), progress=False)
    save_model(model, tmp_path / "m")
    loaded = matbalora.load_model(tmp_path / "m")
    np.testing.assert_allclose(loaded.model.head.input_scale.detach().numpy(), model.head.input_scale.detach().numpy())
    np.testing.assert_allclose(loaded.model.sample_gaps(val[0], samples=0).gaps, model.sample_gaps(val[0], samples=0).gaps, atol=1e-6)
