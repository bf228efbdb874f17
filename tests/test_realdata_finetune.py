"""A short real fine-tune: pretrained CHGNet 0.3.0 + BaLoRA on a few hundred mp_gap crystals.

Checks that the whole pipeline (read, validate, split, cached graphs, ELBO training, recalibration,
model card, reload, prediction) works on real data and learns something: after two epochs the
validation MAE is below that of predicting the training mean, and the training loss fell.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MP_GAP

import matbalora
from matbalora.config import TrainConfig
from matbalora.data.readers import load_dataset
from matbalora.finetune import DataSpec, train_model

N_STRUCTURES = 240


@pytest.mark.realdata
def test_short_balora_finetune_on_mp_gap(tmp_path, monkeypatch):
    if not MP_GAP.is_file():
        pytest.skip(f"{MP_GAP} not present")
    monkeypatch.setenv("MATBALORA_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(str(MP_GAP), max_structures=N_STRUCTURES, val_fraction=0.2, test_fraction=0.1, split_seed=0)
    out = train_model(spec, tmp_path / "model", train=TrainConfig(method="balora", epochs=3, batch_size=8, seed=0),
                      samples=4, progress=False)

    card = json.loads((out / "config.json").read_text())
    history = card["training"]
    assert history["epochs_run"] == 3
    losses = [e["train_loss"] for e in history["history"]]
    assert losses[-1] < losses[0], f"training loss did not fall: {losses}"
    val = card["metrics"]["val"]
    split = json.loads((out / "split.json").read_text())
    ds = load_dataset(MP_GAP, max_structures=N_STRUCTURES)
    train_mean = float(np.mean(ds.targets[split["train"]]))
    baseline = float(np.mean(np.abs(ds.targets[split["val"]] - train_mean)))
    assert val["mae"] < baseline, f"val MAE {val['mae']:.3f} eV vs mean-predictor {baseline:.3f} eV"

    calibration = card["calibration"]  # fitted on validation: scale and floor, conformal on the recalibrated std
    assert calibration["std_scale"] > 0 and calibration["std_floor"] > 0 and calibration["conformal"]["std"] == "recalibrated"
    model = matbalora.load_model(out)
    assert (model.scaler.factor, model.scaler.floor) == (calibration["std_scale"], calibration["std_floor"])
    df = model.predict(ds.structures[:5], samples=4)
    assert (df["std"] >= calibration["std_floor"]).all()
    assert {"band_gap", "std", "lower", "upper"} <= set(df.columns)
    assert (df["lower"] >= 0).all() and (df["std"] > 0).all() and len(df) == 5
