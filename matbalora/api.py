"""The public Python API: load the shipped (or any) model and ensemble."""

from __future__ import annotations

import os
from pathlib import Path

from matbalora.predict import EnsemblePredictor, Predictor

#: The shipped models' folders inside ``models_dir()``.
SHIPPED_MODEL = "balora"
SHIPPED_ENSEMBLE = "lora_ensemble"


def models_dir() -> Path:
    """The folder holding the shipped models: ``$MATBALORA_MODELS`` when set; else the copy an
    installed package carries (``matbalora/shipped_models/``, written by ``setup.py`` into the
    wheel); else the repository's ``models/`` (a source checkout or an editable install)."""
    env = os.environ.get("MATBALORA_MODELS")
    if env:
        return Path(env)
    installed = Path(__file__).resolve().parent / "shipped_models"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "models"


def _resolve(path: str | os.PathLike | None, default: str) -> Path:
    folder = Path(path) if path is not None else models_dir() / default
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {folder} does not exist"
            + ("; the shipped models are in the repository's models/ folder or, installed, in matbalora/shipped_models/ "
               "(set MATBALORA_MODELS to move them)" if path is None else "")
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
