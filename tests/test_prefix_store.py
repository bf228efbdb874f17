"""The on-disk prefix store: fp16/int32 shards that give the in-memory prefixes' outputs, a build that
resumes and rebuilds corrupt shards, training batches without per-crystal collation, and training
from the store (bf16 compute, mid-epoch resume)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_prefix_cache import graphs_of, late_model

from matbalora.backbones.chgnet import FAMILY as CHGNET
from matbalora.backbones.prefix_store import CorruptShardError, PrefixStore, Shard, StoreBatches, build_prefix_store
from matbalora.config import HeadConfig, TrainConfig
from matbalora.model import BandGapModel
from matbalora.training import STATE_JSON, ListBatches, fit


@pytest.fixture
def prefixed(crystals):
    """A model adapting its last block (2 of 3), 8 crystals, their prefixes, ids and fake targets."""
    model = late_model("balora", 2)
    structures = (crystals * 2)[:8]
    prefixes = CHGNET.compute_prefixes(model.backbone, graphs_of(model, structures), 2, progress=False)
    ids = [f"c{i}" for i in range(len(prefixes))]
    return model, prefixes, ids, np.linspace(0.0, 3.0, len(prefixes))


def build(root, prefixed, *, calls=None, **kw):
    _, prefixes, ids, y = prefixed

    def load(positions):
        if calls is not None:
            calls.extend(positions)
        keep = [p for p in positions if p != 5]  # one crystal "fails" and is reported
        return [prefixes[p] for p in keep], [float(y[p]) for p in keep], [ids[p] for p in keep], ({ids[5]: "test rejection"} if 5 in positions else {})

    return build_prefix_store(root, ids=ids, load_shard=load, key="test-key", block=2, shard_size=3, progress=False, **kw)


def test_store_matches_in_memory_prefixes(tmp_path, prefixed):
    model, prefixes, ids, y = prefixed
    store = PrefixStore(build(tmp_path / "s", prefixed))
    assert store.n_shards == 3 and len(store.kept) == 7 and store.rejected() == {"c5": "test rejection"}
    assert store.shards[0].arrays["atom"].dtype == np.float16 and store.shards[0].arrays["atom_graph"].dtype == np.int32
    np.testing.assert_allclose(store.targets(["c0", "c7"]), [y[0], y[7]], rtol=1e-6)
    sel = np.array([0, 2])  # crystals c0, c2 of shard 0
    batch = store.batch(0, sel)
    ref = CHGNET.collate_prefixes(model.backbone, [prefixes[0], prefixes[2]])
    assert torch.equal(batch.state.atom_graph, ref.atom_graph) and torch.equal(batch.state.d2u, ref.d2u)
    assert torch.equal(batch.state.atom_owners, ref.atom_owners)
    with torch.no_grad():
        fp16 = model(batch, samples=1)["gap"]
        fp32 = model([prefixes[0], prefixes[2]], samples=1)["gap"]
        from_graphs = model(store.prefix_graphs(["c0", "c2"]), samples=1)["gap"]
    np.testing.assert_allclose(fp16.numpy(), fp32.numpy(), atol=2e-3)  # fp16 storage costs < 2 meV here
    np.testing.assert_allclose(from_graphs.numpy(), fp16.numpy(), atol=1e-6)
    with pytest.raises(KeyError, match="c5"):
        store.locate(["c5"])


def test_build_resumes_and_rebuilds_a_corrupt_shard(tmp_path, prefixed):
    root = build(tmp_path / "s", prefixed, worker=0, workers=2)  # shards 0 and 2 only
    with pytest.raises(FileNotFoundError, match="missing"):
        PrefixStore(root)
    calls: list[int] = []
    build(root, prefixed, calls=calls, worker=1, workers=2)
    assert calls == [3, 4, 5]  # only shard 1 was missing
    shard = root / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="checksum"):
        Shard(shard)
    calls.clear()
    build(root, prefixed, calls=calls)
    assert calls == [0, 1, 2]  # the corrupt shard and nothing else
    assert len(PrefixStore(root).kept) == 7
    with pytest.raises(ValueError, match="another key"):
        build_prefix_store(root, ids=["x"], load_shard=lambda p: ([], [], [], {}), key="other", block=2, progress=False)
    with pytest.raises(ValueError, match="holds chgnet prefixes, not sevennet"):  # never overwrite another family's shards
        build_prefix_store(root, ids=["x"], load_shard=lambda p: ([], [], [], {}), key="test-key", block=2, family="sevennet", progress=False)


def test_partial_build_then_completion_and_crystals_without_angles(tmp_path, crystals):
    """``upto`` builds only the shards holding the first crystals (a later build completes the store);
    a store entering a block that uses angles keeps crystals that have none (the tiny CHGNet's
    silicon), also a whole shard of them."""
    model = late_model("balora", 2)
    silicon, nacl, copper = crystals[:3]
    block = CHGNET.prefix_block(model.backbone, model.method) - 1  # the block before the adapted one: angles are kept
    prefixes = CHGNET.compute_prefixes(model.backbone, graphs_of(model, [silicon] * 4 + [nacl, copper]), block, progress=False)
    assert [p.bond_graph.shape[0] == 0 for p in prefixes] == [True] * 4 + [False, False]
    ids = [f"c{i}" for i in range(6)]
    calls: list[int] = []

    def load(pos):
        calls.extend(pos)
        return [prefixes[p] for p in pos], [0.0] * len(pos), [ids[p] for p in pos], {}

    root = build_prefix_store(tmp_path / "s", ids=ids, load_shard=load, key="k", block=block, shard_size=3, upto=2, progress=False)
    assert calls == [0, 1, 2] and len(PrefixStore(root, allow_missing=True).kept) == 3
    build_prefix_store(root, ids=ids, load_shard=load, key="k", block=block, shard_size=3, progress=False)
    assert calls == [0, 1, 2, 3, 4, 5]
    store = PrefixStore(root)
    assert store.shards[0].arrays["bond_graph"].shape == (0, 3)
    batch = store.batch(1, np.array([0, 1]))  # silicon (no angles) and NaCl
    ref = CHGNET.collate_prefixes(model.backbone, prefixes[3:5])
    assert batch.state.bond_graph.shape[0] == prefixes[4].bond_graph.shape[0] > 0
    assert torch.equal(batch.state.bond_graph, ref.bond_graph) and torch.equal(batch.state.atom_graph, ref.atom_graph)
    with torch.no_grad():
        np.testing.assert_allclose(model(batch, samples=1)["gap"].numpy(), model(prefixes[3:5], samples=1)["gap"].numpy(), atol=2e-3)


def test_truncated_or_hostile_header_is_refused(tmp_path):
    path = tmp_path / "shard_00000.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptShardError, match="header"):
        Shard(path)


def test_store_batches_cover_each_crystal_once_per_epoch(tmp_path, prefixed):
    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = ["c0", "c1", "c2", "c3", "c4", "c6", "c7"]
    batches = StoreBatches(store, ids)
    seen = []
    for batch, y in batches.epoch(2, torch.Generator().manual_seed(0)):
        assert len(batch) == len(y) <= 2
        seen.extend(y.tolist())
    np.testing.assert_allclose(sorted(seen), sorted(store.targets(ids)), rtol=1e-6)
    all_batches = list(batches.epoch(2, torch.Generator().manual_seed(1)))
    skipped = list(batches.epoch(2, torch.Generator().manual_seed(1), skip=2))
    assert len(skipped) == len(all_batches) - 2 and all(torch.equal(a[1], b[1]) for a, b in zip(all_batches[2:], skipped))


def _fresh(method="balora", pooling="mean_max"):
    """A freshly initialised (seeded) model adapting the last block, with a Gaussian NLL head."""
    return _rebuild(late_model(method, 2), HeadConfig(hidden=8, loss="nll", pooling=pooling))


def _rebuild(model, head):
    from test_prefix_cache import three_block_chgnet

    torch.manual_seed(0)
    return BandGapModel(three_block_chgnet(), method=model.method, adapter=model.adapter_config, head=head)


def test_bf16_training_from_the_store_learns_and_restores_float32_weights(tmp_path, prefixed):
    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    model = _fresh()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    val = (store.prefix_graphs(ids[:3]), store.targets(ids[:3]))
    cfg = TrainConfig(method="balora", epochs=8, patience=8, batch_size=2, lr=1e-2, warmup_steps=1, compute_dtype="bfloat16")
    hist = fit(model, StoreBatches(store, ids), val, cfg, progress=False)
    losses = [h["train_loss"] for h in hist["history"]]
    assert np.all(np.isfinite(losses)) and min(losses[-3:]) < losses[0]
    reference = fit(_fresh(), StoreBatches(store, ids), val, replace(cfg, epochs=1, compute_dtype="float32"), progress=False)
    assert losses[0] == pytest.approx(reference["history"][0]["train_loss"], rel=0.03)  # same batches and draws, bf16 vs fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.backbone.named_parameters():  # frozen weights back to their float32 values, bit for bit
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    out = model.sample_gaps(val[0], samples=4)
    assert out.gaps.shape == (4, 3) and out.aleatoric_var is not None and np.all(out.aleatoric_var > 0)


@pytest.mark.parametrize("native, warned", [(False, True), (True, False), (None, False)])
def test_bf16_training_warns_where_bf16_is_emulated(tmp_path, prefixed, monkeypatch, caplog, native, warned):
    import matbalora.training as training

    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    monkeypatch.setattr(training, "native_bf16", lambda: native)
    cfg = TrainConfig(method="balora", epochs=1, batch_size=4, compute_dtype="bfloat16")
    with caplog.at_level("WARNING", logger=training.log.name):
        fit(_fresh(), StoreBatches(store, ids), (store.prefix_graphs(ids[:2]), store.targets(ids[:2])), cfg, progress=False)
    assert any("without native bf16" in r.getMessage() for r in caplog.records) == warned


def test_native_bf16_answers_without_raising():
    from matbalora.training import native_bf16

    assert native_bf16() in (True, False, None)


def test_mid_epoch_resume_equals_an_uninterrupted_run(tmp_path, prefixed, monkeypatch):
    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    val = (store.prefix_graphs(ids[:3]), store.targets(ids[:3]))
    cfg = TrainConfig(method="balora", epochs=2, batch_size=2, lr=1e-2)
    reference = _fresh()
    fit(reference, StoreBatches(store, ids), val, cfg, out_dir=tmp_path / "ref", progress=False)

    class Killed(Exception):
        pass

    batches = StoreBatches(store, ids)
    original = batches.epoch
    calls = {"n": 0}

    def dying_epoch(*args, **kwargs):
        for item in original(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 6:  # inside epoch 2 (4 batches per epoch), after a mid-epoch checkpoint
                raise Killed
            yield item

    monkeypatch.setattr(batches, "epoch", dying_epoch)
    model = _fresh()
    with pytest.raises(Killed):
        fit(model, batches, val, cfg, out_dir=tmp_path / "run", progress=False, checkpoint_seconds=0.0)
    import json

    assert json.loads((tmp_path / "run" / STATE_JSON).read_text())["in_epoch"]["batches_done"] == 1
    resumed = _fresh()
    fit(resumed, StoreBatches(store, ids), val, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    for (n, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_list_batches_and_mean_max_pooling(prefixed):
    model = late_model("lora", 2)
    mm = _rebuild(model, HeadConfig(hidden=8, pooling="mean_max"))
    _, prefixes, _, y = prefixed
    assert mm.head.body[0].in_features == 2 * model.head.body[0].in_features
    feats = mm.pooled_features(prefixes)
    assert feats.shape == (len(prefixes), 2 * model.backbone.atom_fea_dim)
    assert len(list(ListBatches(prefixes, y).epoch(3, torch.Generator().manual_seed(0)))) == 3


def test_head_refit_on_pooled_features_never_loses_validation_mae(tmp_path, prefixed):
    from matbalora.training import pooled_features_of, refit_head

    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    model = _fresh(method="lora")
    feats, y = pooled_features_of(model, StoreBatches(store, ids), batch_size=3)
    assert feats.shape == (7, 2 * 16) and torch.allclose(torch.sort(y).values, torch.sort(torch.as_tensor(store.targets(ids), dtype=torch.float32)).values)
    np.testing.assert_allclose(feats[np.argsort(y.numpy())].numpy(), model.pooled_features(store.prefix_graphs([ids[i] for i in np.argsort(store.targets(ids))])).numpy(), atol=1e-5)
    out = refit_head(model, (feats, y), (feats[:3], y[:3]), epochs=40, lr=1e-2, batch_size=4)
    assert out["val_mae_after"] < out["val_mae_before"]  # a fresh head fitted to its own crystals improves
    with torch.no_grad():
        assert float((model.head(feats[:3])["gap"] - y[:3]).abs().mean()) == pytest.approx(out["val_mae_after"], rel=1e-5)


def _killed_on_the_third_batch(model, *args, **kwargs) -> None:
    """Run ``pooled_features_of(model, *args, **kwargs)`` and kill it (KeyboardInterrupt) as its third batch starts."""
    from matbalora.training import pooled_features_of

    real = model.family.crystal_features
    calls = []

    def dies_on_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    model.family.crystal_features = dies_on_the_third_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            pooled_features_of(model, *args, **kwargs)
    finally:
        model.family.crystal_features = real


def test_pooled_features_resume_after_a_kill_and_ignore_another_models_checkpoint(tmp_path, prefixed):
    from matbalora.training import pooled_features_of

    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    model = _fresh(method="lora")
    want, want_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2)
    ckpt = tmp_path / "pooled.pt"
    _killed_on_the_third_batch(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w1", save_every_s=0)
    real = model.family.crystal_features
    assert ckpt.is_file()
    assert len(torch.load(ckpt, weights_only=True)["feats"]) == 2  # the two batches done before the kill
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)

    model.family.crystal_features = counting
    try:
        got, got_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w1", save_every_s=0)
    finally:
        model.family.crystal_features = real
    assert len(counted) == 2 and not ckpt.exists()  # 7 crystals in batches of 2: 4 batches, 2 of them resumed
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_y, want_y)
    # a checkpoint written for other weights (another key) is not used
    torch.save({"meta": {"key": "other", "batch_size": 2, "limit": None}, "feats": [torch.zeros(2, got.shape[1])], "ys": [torch.zeros(2)]}, ckpt)
    again, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w1")
    torch.testing.assert_close(again, want)
    # keep=True: the finished pass stays as a cache, and the next call with the same key makes no pass at all
    kept, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w1", keep=True)
    assert torch.load(ckpt, weights_only=True)["complete"] is True
    counted.clear()
    model.family.crystal_features = counting
    try:
        cached, cached_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w1", keep=True)
        other, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w2", keep=True)
    finally:
        model.family.crystal_features = real
    assert len(counted) == 4  # none for the cached key; a full pass (4 batches) for other weights, which then own the file
    torch.testing.assert_close(cached, want)
    torch.testing.assert_close(cached_y, want_y)
    torch.testing.assert_close(kept, want)
    torch.testing.assert_close(other, want)


def test_pooled_features_of_adapter_draws_are_seeded_per_batch_and_resume_to_the_same_rows(tmp_path, prefixed):
    from matbalora.training import pooled_features_of

    store = PrefixStore(build(tmp_path / "s", prefixed))
    ids = sorted(store.kept)
    model = _fresh(method="balora")
    from matbalora.adapters import adapters_of

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh adapter's B is zero: its draws would not move the features
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
            m.log_a.fill_(-1.0)
    mean, mean_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2)
    drawn, drawn_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, draws=3, seed=5)
    assert drawn.shape == (3 * len(ids), mean.shape[1]) and drawn_y.shape == (3 * len(ids),)
    # draw-major within a batch: the first batch's two crystals, three times, with their targets
    torch.testing.assert_close(drawn_y[:6], mean_y[:2].repeat(3))
    first = drawn[:6].reshape(3, 2, -1)
    assert not torch.allclose(first[0], first[1])  # two draws of one crystal differ
    assert (first.mean(0) - mean[:2]).abs().max() < (first - mean[:2]).abs().max()  # the draws scatter about the posterior mean
    again, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, draws=3, seed=5)
    torch.testing.assert_close(again, drawn)
    other_seed, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, draws=3, seed=6)
    assert not torch.allclose(other_seed, drawn)
    # killed after two batches and resumed: the same rows as the unbroken pass
    ckpt = tmp_path / "drawn.pt"
    _killed_on_the_third_batch(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w", save_every_s=0, draws=3, seed=5)
    assert len(torch.load(ckpt, weights_only=True)["feats"]) == 2  # the two batches done before the kill
    resumed, resumed_y = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w", draws=3, seed=5)
    torch.testing.assert_close(resumed, drawn)
    torch.testing.assert_close(resumed_y, drawn_y)
    # a posterior-mean checkpoint of the same key is not taken for drawn features
    pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w", keep=True)
    redrawn, _ = pooled_features_of(model, StoreBatches(store, ids), batch_size=2, checkpoint=ckpt, key="w", keep=True, draws=3, seed=5)
    torch.testing.assert_close(redrawn, drawn)
    with pytest.raises(ValueError, match="BaLoRA"):
        pooled_features_of(_fresh(method="lora"), StoreBatches(store, ids), batch_size=2, draws=2)
