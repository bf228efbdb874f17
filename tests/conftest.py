"""Shared fixtures: a tiny CHGNet (BatchNorm in its gated MLPs) and textbook crystals."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

REPO = Path(__file__).resolve().parents[1]
MP_GAP = REPO.parent / "shared" / "data" / "mp_gap" / "mp_gap.extxyz.gz"


def tiny_chgnet(seed: int = 0, norm: str = "batch"):
    """A 2-block CHGNet with 16-dim features; BatchNorm so frozen-statistics tests can fail."""
    from chgnet.model import CHGNet

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet(
            atom_fea_dim=16,
            bond_fea_dim=16,
            angle_fea_dim=16,
            num_radial=7,
            num_angular=7,
            n_conv=2,
            composition_model=None,
            mlp_hidden_dims=[16],
            gMLP_norm=norm,
            version="tiny-test",
        )
    # give BatchNorm non-trivial running statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    return model.eval()


@pytest.fixture
def tiny_backbone():
    return tiny_chgnet()


def silicon() -> Structure:
    return Structure(Lattice.cubic(5.43), ["Si"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])


def rocksalt_nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def copper() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])


def perovskite() -> Structure:
    return Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


@pytest.fixture
def crystals() -> list[Structure]:
    return [silicon(), rocksalt_nacl().get_primitive_structure(), copper().get_primitive_structure(), perovskite()]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny CHGNet saved in CHGNet's own checkpoint format (as a user would pass one)."""
    path = tmp_path_factory.mktemp("backbone") / "tiny_chgnet.pth.tar"
    torch.save({"model": tiny_chgnet().as_dict()}, path)
    return path


def toy_set(n: int = 12, seed: int = 0) -> tuple[list[Structure], np.ndarray]:
    """Strained textbook crystals with made-up gaps (0 eV for Cu), for loop tests."""
    rng = np.random.default_rng(seed)
    base = [(silicon(), 0.6), (rocksalt_nacl().get_primitive_structure(), 5.0), (copper().get_primitive_structure(), 0.0), (perovskite(), 1.8)]
    structs, gaps = [], []
    for i in range(n):
        s, gap = base[i % len(base)]
        s = s.copy()
        s.scale_lattice(s.volume * float(rng.uniform(0.95, 1.05)))
        structs.append(s)
        gaps.append(gap)
    return structs, np.array(gaps)


def tiny_model(method: str, checkpoint: Path, seed: int = 0, **adapter_kw):
    from matbalora.config import AdapterConfig, HeadConfig
    from matbalora.model import BandGapModel

    torch.manual_seed(seed)
    adapter = AdapterConfig(rank=2, bayesian=method == "balora", **adapter_kw) if method in ("lora", "balora") else None
    return BandGapModel.from_pretrained(method, adapter=adapter, head=HeadConfig(hidden=8), checkpoint=checkpoint)


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_checkpoint, tmp_path_factory) -> Path:
    """A folder laid out like ``models/``: ``balora/`` and a 2-member ``lora_ensemble/``, with
    random (non-zero) adapter weights so predictions and spreads are non-trivial."""
    from matbalora.adapters import adapters_of
    from matbalora.atomic import write_json
    from matbalora.checkpoint import save_model

    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(7)

    def randomize(model, log_a=None):
        with torch.no_grad():
            for m in adapters_of(model.backbone):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
                if log_a is not None:
                    m.log_a.fill_(log_a)
        return model

    save_model(randomize(tiny_model("balora", tiny_checkpoint), log_a=-1.0), root / "balora",
               extra={"calibration": {"std_scale": 1.5}})
    for k in range(2):
        save_model(randomize(tiny_model("lora", tiny_checkpoint, seed=k)), root / "lora_ensemble" / f"member_{k}")
    write_json(root / "lora_ensemble" / "ensemble.json", {"members": ["member_0", "member_1"], "calibration": {"std_scale": 1.0}})
    return root


@pytest.fixture
def shipped_like(tiny_model_dirs, monkeypatch) -> Path:
    """Point the default (shipped) model location at the tiny models."""
    monkeypatch.setenv("MATBALORA_MODELS", str(tiny_model_dirs))
    return tiny_model_dirs
