"""Model folders: ``config.json`` (what was trained, on what, how well) + ``model.safetensors``.

Only trained weights are saved (adapters + head; the whole backbone for ``full``). The backbone is
rebuilt from its own checkpoint, and loading refuses a folder whose backbone version differs from
the one available, a weight file whose SHA-256 differs from the one recorded, or missing/extra
tensors. Nothing is ever unpickled from a model folder: weights are safetensors, and a custom
backbone checkpoint named in the config (CHGNet's own format is a torch pickle) is read with
``torch.load(weights_only=True)``, which admits tensors and plain containers only (for SevenNet
checkpoints also numeric numpy arrays, see :func:`matbalora.backbones.sevennet.read_checkpoint`).
The card is checked (``matbalora.model_card``: size, nesting, types and ranges) before anything is
built, weights holding NaN or inf are refused, and every refusal names the folder's file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from matbalora.atomic import atomic_write, sha256_file, write_json
from matbalora.config import AdapterConfig, HeadConfig, from_dict, to_dict
from matbalora.backbones import BACKBONES, get_backbone
from matbalora.model import BandGapModel
from matbalora.model_card import MAX_CONFIG_BYTES, check_card, parse_card

FORMAT = "matbalora-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the reason."""


def trained_state(model: BandGapModel) -> dict[str, torch.Tensor]:
    """The tensors a model folder stores: every trainable parameter, contiguous, on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def model_config(model: BandGapModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": {
            "name": model.backbone_name,
            "version": model.backbone_version,
            "package_version": model.family.package_version(),
            "checkpoint": model.backbone_checkpoint,
            "checkpoint_sha256": sha256_file(model.backbone_checkpoint) if model.backbone_checkpoint else None,
        },
        "method": model.method,
        "adapter": to_dict(model.adapter_config) if model.adapter_config else None,
        "head": to_dict(model.head_config),
    }


def save_model(model: BandGapModel, folder: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` then ``folder/config.json`` (both atomically).

    ``extra`` (calibration, data provenance, split, metrics, training command...) is stored in the
    config under its own keys.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(trained_state(model), tmp, metadata={"format": FORMAT}))
    config = model_config(model)
    config["weights"] = {WEIGHTS: sha256_file(folder / WEIGHTS)}
    for key, value in (extra or {}).items():
        if key in config:
            raise ValueError(f"extra key {key!r} would overwrite the model config")
        config[key] = value
    write_json(folder / CONFIG, config)
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config.json, read within ``model_card``'s size and nesting bounds."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (not a matbalora model folder)")
    try:
        with open(path, encoding="utf-8") as fh:
            config = parse_card(fh.read(MAX_CONFIG_BYTES + 1))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelFolderError(f"{path}: {exc}") from None
    if config.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: format is not {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    return config


def verify_weights(folder: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Check the weight file exists and its SHA-256 matches the config; returns its path."""
    path = Path(folder) / WEIGHTS
    expected = (config.get("weights") or {}).get(WEIGHTS)
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing weight file")
    if not expected:
        raise ModelFolderError(f"{Path(folder) / CONFIG}: records no SHA-256 for {WEIGHTS}")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelFolderError(f"{path}: SHA-256 {actual[:12]}... does not match config ({expected[:12]}...): truncated or modified")
    return path


def load_backbone(folder: str | os.PathLike, backbone: dict[str, Any]) -> torch.nn.Module:
    """The backbone a model folder names: its family's shipped weights (``checkpoint`` null), or the
    checkpoint file, checked against its recorded SHA-256 and loaded without unpickling objects."""
    config_path = Path(folder) / CONFIG
    ckpt = backbone.get("checkpoint")
    family = get_backbone(backbone.get("name"))
    if ckpt is None:
        return family.load(None)
    if not isinstance(ckpt, str) or not os.path.isfile(ckpt):
        raise ModelFolderError(f"{str(ckpt)[:200]}: backbone checkpoint named in {config_path} does not exist")
    if backbone.get("checkpoint_sha256") and sha256_file(ckpt) != backbone["checkpoint_sha256"]:
        raise ModelFolderError(f"{ckpt}: backbone checkpoint differs from the one the model was trained on (named in {config_path})")
    try:
        return family.load(ckpt)  # tensors and plain containers only (numeric numpy arrays for SevenNet)
    except ValueError as exc:
        raise ModelFolderError(f"{config_path}: {exc}; model folders never unpickle objects") from None
    except (RuntimeError, KeyError, TypeError, OSError) as exc:  # a checkpoint of another shape or family
        raise ModelFolderError(f"{config_path}: backbone checkpoint {ckpt} does not load ({type(exc).__name__}: {exc})") from None


def _check_finite(weights: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse a weight file holding NaN or inf (it would predict NaN for every crystal)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelFolderError(f"{weights}: tensor {name} holds {bad} NaN or infinite values")


def load_model_folder(folder: str | os.PathLike) -> tuple[BandGapModel, dict]:
    """Rebuild the model of a folder: its backbone checkpoint, adapters, head and trained weights."""
    config = read_config(folder)
    bb = config.get("backbone")
    if not isinstance(bb, dict) or not isinstance(bb.get("name"), str) or bb["name"] not in BACKBONES:
        name = bb.get("name") if isinstance(bb, dict) else bb
        raise ModelFolderError(f"{Path(folder) / CONFIG}: backbone {str(name)[:80]!r} is not supported")
    try:
        check_card(config)  # before anything is built
    except ValueError as exc:
        raise ModelFolderError(f"{Path(folder) / CONFIG}: {exc}") from None
    weights = verify_weights(folder, config)
    backbone = load_backbone(folder, bb)
    found = get_backbone(bb["name"]).backbone_version(backbone)
    if found != bb.get("version"):
        raise ModelFolderError(
            f"{Path(folder) / CONFIG}: trained on backbone {bb.get('name')} {bb.get('version')!r}, "
            f"but the available backbone is {found!r}; use the matching checkpoint"
        )
    try:
        # folders written before ``last_blocks`` existed adapted every matched block
        adapter = from_dict(AdapterConfig, {"last_blocks": 0, **config["adapter"]}) if config.get("adapter") else None
        head = from_dict(HeadConfig, config["head"])
        model = BandGapModel(
            backbone, method=config["method"], adapter=adapter, head=head, backbone_checkpoint=bb.get("checkpoint"), backbone_name=bb["name"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise ModelFolderError(f"{Path(folder) / CONFIG}: method/adapter/head do not describe a model ({what})") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFolderError(f"{weights}: unreadable safetensors file ({exc})") from None
    _check_finite(weights, state)
    expected = set(trained_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFolderError(f"{weights}: tensors do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ModelFolderError(f"{weights}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return model.eval(), config


def with_adapters(model: BandGapModel, adapter: AdapterConfig) -> BandGapModel:
    """``model`` rebuilt with ``adapter`` in place of its adapters (e.g. ``last_blocks=2`` where it had
    1), every trained tensor of ``model`` carried over: the adapters it adds start with B = 0, so the
    result computes the same function until it is trained. Refuses an ``adapter`` that would drop or
    reshape a trained tensor, or change LoRA into BaLoRA or back."""
    old = model.adapter_config
    if old is None:
        raise ValueError(f"a {model.method} model has no adapters to widen")
    if adapter.bayesian != old.bayesian:
        raise ValueError(f"adapter.bayesian={adapter.bayesian} differs from the model's ({old.bayesian}): widening keeps the method")
    wider = BandGapModel(
        get_backbone(model.backbone_name).load(model.backbone_checkpoint), method=model.method, adapter=adapter, head=model.head_config,
        backbone_checkpoint=model.backbone_checkpoint, backbone_name=model.backbone_name,
    )
    state, params = trained_state(model), dict(wider.named_parameters())
    dropped = sorted(n for n in state if n not in params or not params[n].requires_grad)
    if dropped:
        raise ValueError(f"adapter {adapter} has no place for trained tensors {dropped[:3]} ({len(dropped)} in all)")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"adapter {adapter}: {name} would change shape {tuple(tensor.shape)} -> {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return wider.train(model.training)
