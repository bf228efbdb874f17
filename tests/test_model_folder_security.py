"""Shared model folders are verified, never unpickled, and refused with the file and the reason.

Covers a truncated, a tampered (same length) and a missing weight file, a version-mismatched or
swapped backbone, broken configs, and pickles: one lying next to the weights, one in place of
them, and one named as the backbone checkpoint by an edited config. Each pickle's payload would
create a marker file when unpickled; the marker must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat

import pytest
import torch

from conftest import tiny_model
from matbalora.atomic import sha256_file
from matbalora.checkpoint import CONFIG, WEIGHTS, ModelFolderError, load_model_folder, save_model


class Payload:
    """Unpickling this object opens (creates) ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "balora"
    save_model(tiny_model("balora", tiny_checkpoint), folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "shared_model"
    shutil.copytree(saved, copy)
    return copy


def _edit_config(folder, **changes) -> None:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    for dotted, value in changes.items():
        node, *keys = dotted.split("__")
        target = config
        for key in [node, *keys][:-1]:
            target = target[key]
        target[[node, *keys][-1]] = value
    path.write_text(json.dumps(config))


def _refused(folder, *needles: str) -> str:
    with pytest.raises(ModelFolderError) as info:
        load_model_folder(folder)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_intact_folder_loads(folder):
    _, config = load_model_folder(folder)
    assert config["weights"][WEIGHTS] == sha256_file(folder / WEIGHTS)


def test_saved_files_are_readable_by_colleagues(tiny_checkpoint, tmp_path):
    """Atomic writes go through a temporary file (mode 0o600); the result must not stay private."""
    old = os.umask(0o022)
    try:
        save_model(tiny_model("lora", tiny_checkpoint), tmp_path / "m")
    finally:
        os.umask(old)
    for name in (WEIGHTS, CONFIG):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


def test_truncated_weights(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])
    _refused(folder, str(folder / WEIGHTS), "SHA-256", "truncated or modified")


def test_tampered_weights_same_length(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor's data
    (folder / WEIGHTS).write_bytes(bytes(data))
    _refused(folder, str(folder / WEIGHTS), "does not match config")


def test_missing_weights_and_config(folder):
    (folder / WEIGHTS).unlink()
    _refused(folder, str(folder / WEIGHTS), "missing weight file")
    (folder / CONFIG).unlink()
    _refused(folder, str(folder / CONFIG), "missing")


def test_config_without_checksum(folder):
    _edit_config(folder, weights={})
    _refused(folder, str(folder / CONFIG), "records no SHA-256")


def test_backbone_version_mismatch(folder):
    _edit_config(folder, backbone__version="0.3.0")
    _refused(folder, str(folder / CONFIG), "trained on backbone chgnet '0.3.0'", "'tiny-test'")


def test_swapped_backbone_checkpoint(folder, tmp_path):
    other = tmp_path / "other.pth.tar"
    torch.save(
        {
            "model": tiny_model(
                "head", json.loads((folder / CONFIG).read_text())["backbone"]["checkpoint"]
            ).backbone.as_dict()
        },
        other,
    )
    _edit_config(folder, backbone__checkpoint=str(other))
    _refused(folder, str(other), "differs from the one the model was trained on")


def test_broken_config_fields_name_the_config(folder):
    _edit_config(folder, head={"hidden": "many", "unknown_key": 1})
    _refused(folder, str(folder / CONFIG), "head.hidden='many' must be an integer")
    _edit_config(folder, head={"hidden": 8, "layers": 1, "unknown_key": 1})
    _refused(folder, str(folder / CONFIG), "do not describe a model")
    _edit_config(folder, backbone="chgnet")
    _refused(folder, str(folder / CONFIG), "is not supported")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pkl", "adapter_model.bin"])
def test_pickle_next_to_the_weights_is_ignored(folder, tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, folder / name)
    load_model_folder(folder)
    assert not marker.exists()


def test_pickle_in_place_of_the_weights_is_refused(folder, tmp_path):
    marker = tmp_path / "pwned"
    (folder / WEIGHTS).write_bytes(pickle.dumps({"head.out.weight": Payload(marker)}))
    _edit_config(folder, weights={WEIGHTS: sha256_file(folder / WEIGHTS)})  # the sender fixed the checksum too
    _refused(folder, str(folder / WEIGHTS), "unreadable safetensors")
    assert not marker.exists()


def test_pickle_named_as_backbone_checkpoint_is_never_unpickled(folder, tmp_path):
    """Before: CHGNet.from_file(torch.load(weights_only=False)) ran whatever the file held."""
    marker = tmp_path / "pwned"
    evil = folder / "backbone.pth.tar"
    torch.save({"model": Payload(marker)}, evil)
    _edit_config(folder, backbone__checkpoint=str(evil), backbone__checkpoint_sha256=sha256_file(evil))
    _refused(folder, str(evil), "backbone checkpoint refused", "never unpickle")
    assert not marker.exists()


def test_training_backbone_checkpoint_is_never_unpickled(tmp_path):
    """``load_chgnet(path)`` (used by ``matbalora train --checkpoint``) refuses a pickled object."""
    import pickle

    from matbalora.backbones.chgnet import load_chgnet

    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="evil.pt"):
        load_chgnet(bad)
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------ issue 18, item 8: the card is checked first


def test_non_finite_weights_are_refused_at_load(folder):
    """Before: NaN weights (checksum updated) loaded silently and predicted NaN with exit 0."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / WEIGHTS))
    name = sorted(state)[0]
    state[name] = state[name].clone().fill_(float("nan"))
    save_file(state, str(folder / WEIGHTS))
    _edit_config(folder, weights={WEIGHTS: sha256_file(folder / WEIGHTS)})
    _refused(folder, str(folder / WEIGHTS), f"tensor {name} holds", "NaN or infinite")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"adapter__rank": 4e6}, "adapter.rank=4000000.0 must be an integer in [1, 256]"),  # before: 10 GB allocated
    ({"adapter__rank": 4_000_000}, "adapter.rank=4000000 must be an integer"),
    ({"head__hidden": 10**6}, "head.hidden=1000000 must be an integer in [1, 2048]"),
    ({"head__variance_members": 10**6}, "head.variance_members=1000000 must be an integer in [1, 64]"),
    ({"calibration": {"std_scale": 1e-3}}, "calibration.std_scale=0.001 must be a finite number in [0.01, 1e+08]"),
    ({"calibration": {"std_scale": "wide"}}, "calibration.std_scale='wide'"),  # before: ValueError without the folder
    ({"calibration": {"std_scale": 2.0, "std_floor": -1}}, "calibration.std_floor=-1"),
    ({"method": "magic"}, "method='magic' is not one of"),
])
def test_card_fields_are_checked_before_anything_is_built(folder, monkeypatch, changes, needle):
    import matbalora.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_backbone", lambda *a: pytest.fail("built a backbone from a bad card"))
    _edit_config(folder, **changes)
    _refused(folder, str(folder / CONFIG), needle)


def test_deeply_nested_or_huge_card_is_refused(folder):
    """Before: a deeply nested config.json raised RecursionError."""
    (folder / CONFIG).write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(folder, str(folder / CONFIG), "nested deeper than")
    (folder / CONFIG).write_text('{"a": ' + "[" * 40 + "]" * 40 + "}")
    _refused(folder, str(folder / CONFIG), "nested deeper than 32 levels")
    (folder / CONFIG).write_text(" " * (5 << 20))
    _refused(folder, str(folder / CONFIG), "characters >")


def test_predictor_load_names_the_folder(folder):
    from matbalora.predict import Predictor

    _edit_config(folder, calibration={"std_scale": float("inf")})
    with pytest.raises(ModelFolderError, match=str(folder / CONFIG)):
        Predictor.load(folder)
