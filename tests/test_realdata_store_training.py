"""The out-of-core recipe end to end on real crystals: pretrained CHGNet 0.3.0, frozen-prefix features
in an on-disk fp16 store, BaLoRA with an L1 + Gaussian-NLL head (l1_nll) and mean+max pooling trained in bfloat16
from store batches, a head refit on pooled features, recalibration, model card, reload, prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import MP_GAP

import matbalora
from matbalora.backbones.chgnet import FAMILY as CHGNET
from matbalora.backbones.prefix_store import PrefixStore, StoreBatches, build_prefix_store
from matbalora.checkpoint import load_model_folder
from matbalora.config import HeadConfig, TrainConfig
from matbalora.data.readers import load_dataset
from matbalora.data.splits import Split
from matbalora.finetune import PreparedData, features_fingerprint, train_model
from matbalora.model import BandGapModel

N_TRAIN, N_VAL = 128, 40


@pytest.mark.realdata
@pytest.mark.pretrained
def test_store_training_with_nll_head_and_refit(tmp_path):
    if not MP_GAP.is_file():
        pytest.skip(f"{MP_GAP} not present")
    ds = load_dataset(MP_GAP, max_structures=N_TRAIN + N_VAL)
    backbone = BandGapModel.from_pretrained("balora").backbone
    ids = list(ds.ids)

    fp32_bytes = []

    def load(positions):
        graphs = [backbone.graph_converter(ds.structures[p]) for p in positions]
        prefixes = CHGNET.compute_prefixes(backbone, graphs, 3, progress=False)
        fp32_bytes.extend(p.nbytes() for p in prefixes)
        return prefixes, [float(ds.targets[p]) for p in positions], [ids[p] for p in positions], {}

    store = PrefixStore(build_prefix_store(tmp_path / "store", ids=ids, load_shard=load, key="t", block=3, shard_size=64, progress=False))
    assert store.nbytes() < 0.6 * sum(fp32_bytes)  # fp16 features / int32 indices vs the in-memory fp32 / int64
    val_ids = ids[N_TRAIN:]
    graphs = store.prefix_graphs(val_ids)
    data = PreparedData(ids=val_ids, formulas=[s.composition.reduced_formula for s in ds.structures[N_TRAIN:]], n_atoms=[len(s) for s in ds.structures[N_TRAIN:]],
                        targets=store.targets(val_ids), graphs=graphs, split=Split(np.zeros(0, np.int64), np.arange(20), np.arange(20, N_VAL), kind="test"),
                        provenance={"source": str(MP_GAP)})
    cfg = TrainConfig(method="balora", epochs=3, batch_size=16, beta=0.01, kl_warmup_steps=10, compute_dtype="bfloat16", head_refit_epochs=20)
    out = train_model(None, tmp_path / "model", train=cfg, head=HeadConfig(loss="l1_nll", pooling="mean_max"), data=data,
                      train_batches=StoreBatches(store, ids[:N_TRAIN]), samples=4, progress=False)
    card = json.loads((out / "config.json").read_text())
    assert card["data"]["n_train"] == N_TRAIN and card["training"]["epochs_run"] == 3
    refit = card["training"]["head_refit"]
    assert refit["val_mae_after"] <= refit["val_mae_before"] and refit["epochs_run"] >= 1
    val_y = data.targets[:20]
    assert card["metrics"]["val"]["mae"] < float(np.mean(np.abs(val_y - np.mean(store.targets(ids[:N_TRAIN])))))  # beats the mean predictor
    model = matbalora.load_model(out)
    df = model.predict(ds.structures[N_TRAIN : N_TRAIN + 4], samples=4)
    assert np.all(df["std_aleatoric"] > 0) and np.all(df["std_epistemic"] > 0) and np.all(df["std"] >= df["std_aleatoric"] * card["calibration"]["std_scale"] * 0.999)

    # a warm restart continues from the folder's weights: its first epoch starts where the cold run ended
    warm = train_model(None, tmp_path / "warm", train=TrainConfig(method="balora", epochs=1, batch_size=16, beta=0.01, compute_dtype="bfloat16"), data=data,
                       train_batches=StoreBatches(store, ids[:N_TRAIN]), samples=4, progress=False, init_from=out)
    warm_card = json.loads((warm / "config.json").read_text())
    assert warm_card["training"]["total_epochs"] == 4 and warm_card["training"]["init_from"]["folder"] == str(out)
    assert warm_card["head"] == card["head"] and warm_card["adapter"] == card["adapter"]
    assert warm_card["training"]["history"][0]["train_loss"] < card["training"]["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="cannot warm-start"):
        train_model(None, tmp_path / "bad", train=TrainConfig(method="lora", epochs=1), data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), init_from=out, progress=False)

    # separate variance MLPs on the trained folder: the gap and adapters stay, the card says what was refit
    from matbalora.finetune import refit_variance_of

    var = refit_variance_of(out, tmp_path / "var", data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), members=2, epochs=5,
                            crystals=N_TRAIN, samples=4)
    var_card = json.loads((var / "config.json").read_text())
    assert var_card["head"]["variance"] == "separate" and var_card["head"]["variance_members"] == 2
    assert var_card["training"]["variance_refit"]["members"] == 2 and var_card["training"]["variance_refit"]["source"] == str(out)
    assert var_card["training"]["history"] == card["training"]["history"] and (var / "split.json").is_file()
    assert var_card["training"]["parameters"]["trainable"] > card["training"]["parameters"]["trainable"]  # the members are counted
    refit = matbalora.load_model(var)
    a, b = model.predict(ds.structures[N_TRAIN : N_TRAIN + 4], samples=0), refit.predict(ds.structures[N_TRAIN : N_TRAIN + 4], samples=0)
    assert np.allclose(a["band_gap"], b["band_gap"], atol=1e-4) and np.all(b["std_aleatoric"] > 0)
    assert not np.allclose(a["std_aleatoric"], b["std_aleatoric"])

    # a new, wider gap head trained afresh on the frozen features, with smaller variance MLPs: the adapters stay
    from matbalora.finetune import rehead_of

    wide = HeadConfig(hidden=32, layers=3, loss="l1", pooling="mean_max", standardize=True)
    # 128 crystals are one step per epoch: a higher lr than the full pool's 3e-4
    new = rehead_of(out, tmp_path / "rehead", data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), head=wide, epochs=60, lr=3e-3,
                    members=2, variance_hidden=8, variance_layers=1, variance_epochs=5, variance_folds=2, fold_epochs=10, samples=4,
                    draw_crystals=64, draws=2)
    new_card = json.loads((new / "config.json").read_text())
    head = new_card["head"]
    assert (head["hidden"], head["layers"], head["loss"], head["variance"], head["variance_members"], head["variance_hidden"], head["variance_layers"]) == (
        32, 3, "l1_nll", "separate", 2, 8, 1)
    assert new_card["adapter"] == card["adapter"] and new_card["training"]["history"] == card["training"]["history"]
    info = new_card["training"]["rehead"]
    assert info["crystals"] == N_TRAIN and info["source"] == str(out) and info["variance_refit"]["members"] == 2
    assert info["variance_refit"]["residuals"] == "out of 2 folds, 10 epochs each"
    assert (info["head_refit"]["drawn_rows"], info["head_refit"]["draws"]) == (128, 2)  # 64 crystals, two adapter draws each
    # kept for the next refit, keyed by the backbone and adapters: the reheaded model shares the key
    key = features_fingerprint(load_model_folder(out)[0])[:16]
    assert key == features_fingerprint(load_model_folder(new)[0])[:16]
    assert (tmp_path / f".pooled_{key}_64_draws2_seed0.pt").is_file()
    assert info["head_refit"]["val_mae_after"] < info["head_refit"]["val_mae_before"]  # the fresh head learned
    assert new_card["metrics"]["val"]["mae"] < float(np.mean(np.abs(val_y - np.mean(store.targets(ids[:N_TRAIN])))))
    c = matbalora.load_model(new).predict(ds.structures[N_TRAIN : N_TRAIN + 4], samples=4)
    assert np.all(np.isfinite(c["band_gap"])) and np.all(c["std_aleatoric"] > 0) and not np.allclose(c["band_gap"], df["band_gap"])
    # a head ensemble: two gap heads, the first the one fitted above and the folds as well (kept next to the runs)
    def kept(kind: str) -> list:
        return sorted(tmp_path.glob(f".{kind}_*.pt"))

    assert len(kept("gaphead")) == 1 and len(kept("oofgaps")) == 1
    pair = rehead_of(out, tmp_path / "rehead_pair", data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), head=wide, epochs=60, lr=3e-3,
                     members=2, variance_hidden=8, variance_layers=1, variance_epochs=5, variance_folds=2, fold_epochs=10, samples=4,
                     draw_crystals=64, draws=2, gap_members=2)
    assert len(kept("gaphead")) == 2 and len(kept("oofgaps")) == 1
    pair_card = json.loads((pair / "config.json").read_text())
    assert pair_card["head"]["gap_members"] == 2 and [m["seed"] for m in pair_card["training"]["rehead"]["head_refit"]["gap_members"]] == [0, 1]
    single_head, pair_head = load_model_folder(new)[0].head.state_dict(), load_model_folder(pair)[0].head.state_dict()
    first = [k for k in pair_head if not k.startswith(("gap_members.", "variance"))]
    assert first and all(torch.equal(pair_head[k], single_head[k]) for k in first)
    d = matbalora.load_model(pair).predict(ds.structures[N_TRAIN : N_TRAIN + 4], samples=4)
    assert np.all(np.isfinite(d["band_gap"])) and np.all(d["std_epistemic"] > 0)
    # bagged: two more heads, each on its own resample of the rows; the card says so
    bagged = rehead_of(out, tmp_path / "rehead_bagged", data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), head=wide, epochs=60, lr=3e-3,
                       members=2, variance_hidden=8, variance_layers=1, variance_epochs=5, samples=4, draw_crystals=64, draws=2,
                       gap_members=2, bootstrap=True)
    assert len(kept("gaphead")) == 4 and "bootstrap" not in pair_card["training"]["rehead"]["head_refit"]
    assert json.loads((bagged / "config.json").read_text())["training"]["rehead"]["head_refit"]["bootstrap"] is True
    bagged_head = load_model_folder(bagged)[0].head.state_dict()
    assert not torch.equal(bagged_head["out.weight"], pair_head["out.weight"])
    with pytest.raises(ValueError, match="pooled by 'mean_max'"):
        rehead_of(out, tmp_path / "bad_head", data=data, train_batches=StoreBatches(store, ids[:N_TRAIN]), head=HeadConfig(pooling="mean"))
