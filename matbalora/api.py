"""The public Python API: load the shipped (or any) model and ensemble."""

from __future__ import annotations

import os
from pathlib import Path

from matbalora.predict import EnsemblePredictor, Predictor

#: Shipped models live in the repository's ``models/`` folder; ``$MATBALORA_MODELS`` overrides it.
SHIPPED_MODEL = "balora"
SHIPPED_ENSEMBLE = "lora_ensemble"


def models_dir() -> Path:
    env = os.environ.get("MATBALORA_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "models"


def _resolve(path: str | os.PathLike | None, default: str) -> Path:
    folder = Path(path) if path is not None else models_dir() / default
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {folder} does not exist"
            + ("; the shipped models are in the repository's models/ folder (set MATBALORA_MODELS to move them)" if path is None else "")
        )
    return folder


def load_model(path: str | os.PathLike | None = None) -> Predictor:
    """A trained model folder (default: the shipped BaLoRA-CHGNet band-gap model).

    ``.predict(structures, *, samples=16, level=0.9)`` returns a DataFrame with
    ``id, formula, n_atoms, band_gap, std, lower, upper`` (eV) and more.
    """
    return Predictor.load(_resolve(path, SHIPPED_MODEL))


def load_ensemble(path: str | os.PathLike | None = None) -> EnsemblePredictor:
    """A deep-ensemble folder (default: the shipped 5 LoRA-CHGNet models)."""
    return EnsemblePredictor.load(_resolve(path, SHIPPED_ENSEMBLE))
