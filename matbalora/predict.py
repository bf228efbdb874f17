"""Predictions with uncertainty as DataFrames: one BaLoRA (or LoRA) model, or a deep ensemble.

Columns (eV): ``id, formula, n_atoms, band_gap, std, lower, upper, std_epistemic, std_aleatoric, error``.
``std`` is the total standard deviation (epistemic from the Monte-Carlo draws or ensemble members,
plus aleatoric where the head learned one), recalibrated as ``sqrt((k std)^2 + c^2)`` with the scale
``k`` and floor ``c`` fitted on the validation split when the model folder records them
(:class:`matbalora.calibration.StdScaler`; ``std_epistemic``/``std_aleatoric`` stay raw). ``lower``/``upper`` is the central Gaussian
interval at ``level``, clipped at 0 eV. Inputs that fail validation keep their row, with NaN numbers
and the reason in ``error``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from matbalora.calibration import StdScaler, gaussian_interval
from matbalora.checkpoint import load_model_folder
from matbalora.data.validation import DEFAULT_MAX_ATOMS, check_structure
from matbalora.model import BandGapModel

COLUMNS = ["id", "formula", "n_atoms", "band_gap", "std", "lower", "upper", "std_epistemic", "std_aleatoric", "error"]
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class Prepared:
    """Validated inputs: per-row metadata, and graphs for the rows that passed."""

    ids: list[str]
    formulas: list[str]
    n_atoms: list[int]
    errors: list[str]
    graphs: list = field(default_factory=list)
    graph_rows: list[int] = field(default_factory=list)


def as_structure(obj: Any):
    """pymatgen Structure from a Structure or ASE Atoms; TypeError otherwise."""
    from pymatgen.core import Structure

    if isinstance(obj, Structure):
        return obj
    try:
        from ase import Atoms

        if isinstance(obj, Atoms):
            from pymatgen.io.ase import AseAtomsAdaptor

            return AseAtomsAdaptor.get_structure(obj)
    except ImportError:  # pragma: no cover - ase is a dependency
        pass
    raise TypeError(f"expected a pymatgen Structure or ASE Atoms, got {type(obj).__name__}")


def prepare(model: BandGapModel, structures: Iterable, ids: Sequence[str] | None = None, *, max_atoms: int = DEFAULT_MAX_ATOMS) -> Prepared:
    """Validate inputs and convert the valid ones to graphs with the model's own converter."""
    single = hasattr(structures, "lattice") or hasattr(structures, "cell")  # one Structure or one ASE Atoms
    items = [structures] if single and not isinstance(structures, (list, tuple)) else list(structures)
    if ids is not None and len(ids) != len(items):
        raise ValueError(f"ids has {len(ids)} entries for {len(items)} structures")
    prep = Prepared([], [], [], [])
    for row, obj in enumerate(items):
        sid = str(ids[row]) if ids is not None else str(row)
        try:
            struct = as_structure(obj)
        except TypeError as exc:
            prep.ids.append(sid), prep.formulas.append(""), prep.n_atoms.append(0), prep.errors.append(str(exc))
            continue
        prep.ids.append(sid)
        prep.formulas.append(struct.composition.formula.replace(" ", "") if len(struct) else "")
        prep.n_atoms.append(len(struct))
        found = check_structure(struct, max_atoms=max_atoms)
        reason = None if found is None else f"{found[0]}: {found[1]}"
        if reason is None:
            try:
                prep.graphs.append(model.structure_to_graph(struct, graph_id=sid))
                prep.graph_rows.append(row)
            except Exception as exc:  # the converter rejects e.g. isolated atoms
                reason = f"graph conversion failed: {exc}"
        prep.errors.append(reason or "")
    return prep


def raw_total_std(epistemic: np.ndarray, aleatoric: np.ndarray) -> np.ndarray:
    """Epistemic and aleatoric std combined, before recalibration; NaN where both are NaN (eV)."""
    total = np.hypot(np.nan_to_num(epistemic), np.nan_to_num(aleatoric))
    total[np.isnan(epistemic) & np.isnan(aleatoric)] = np.nan
    return total


def _frame(prep: Prepared, mean: np.ndarray, epi: np.ndarray, alea: np.ndarray, scaler: StdScaler, level: float) -> pd.DataFrame:
    n = len(prep.ids)
    cols = {k: np.full(n, np.nan) for k in ("band_gap", "std_epistemic", "std_aleatoric")}
    rows = np.asarray(prep.graph_rows, dtype=int)
    cols["band_gap"][rows] = mean
    cols["std_epistemic"][rows] = epi
    cols["std_aleatoric"][rows] = alea
    std = scaler.transform(raw_total_std(cols["std_epistemic"], cols["std_aleatoric"]))  # recalibrated on validation: sqrt((k total)^2 + floor^2)
    lower, upper = gaussian_interval(cols["band_gap"], std, level)
    return pd.DataFrame(
        {
            "id": prep.ids,
            "formula": prep.formulas,
            "n_atoms": prep.n_atoms,
            "band_gap": cols["band_gap"],
            "std": std,
            "lower": lower,
            "upper": upper,
            "std_epistemic": cols["std_epistemic"],
            "std_aleatoric": cols["std_aleatoric"],
            "error": prep.errors,
        },
        columns=COLUMNS,
    )


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1)")


class Predictor:
    """A trained band-gap model with its card; ``predict`` gives the DataFrame described above."""

    def __init__(self, model: BandGapModel, config: dict | None = None) -> None:
        self.model = model
        self.config = config or {}
        self.scaler = StdScaler.from_calibration(self.config.get("calibration"))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Predictor:
        model, config = load_model_folder(folder)
        return cls(model, config)

    @property
    def card(self) -> dict:
        return self.config

    def predict(self, structures, *, samples: int = 16, level: float = 0.9, ids: Sequence[str] | None = None, seed: int | None = 0, max_atoms: int = DEFAULT_MAX_ATOMS) -> pd.DataFrame:
        """Structures/Atoms in, one row per input in input order. ``samples=0``: posterior mean only.
        Structures above ``max_atoms`` are rejected (their row says so)."""
        _check_level(level)
        prep = prepare(self.model, structures, ids, max_atoms=max_atoms)
        return self.predict_prepared(prep, samples=samples, level=level, seed=seed)

    def sample(self, prep: Prepared, *, samples: int, seed: int | None = 0):
        return self.model.sample_gaps(prep.graphs, samples=samples, seed=seed)

    def predict_prepared(self, prep: Prepared, *, samples: int = 16, level: float = 0.9, seed: int | None = 0) -> pd.DataFrame:
        _check_level(level)
        draws = self.sample(prep, samples=samples, seed=seed)
        mean = draws.gaps.mean(0)
        epi = draws.gaps.std(0, ddof=1) if draws.gaps.shape[0] > 1 else np.full(mean.shape, np.nan)
        alea = np.sqrt(draws.aleatoric_var) if draws.aleatoric_var is not None else np.full(mean.shape, np.nan)
        return _frame(prep, mean, epi, alea, self.scaler, level)


class EnsemblePredictor:
    """Deep ensemble of independently trained models: mean and spread of member predictions."""

    def __init__(self, members: Sequence[Predictor], config: dict | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = list(members)
        self.config = config or {}
        self.scaler = StdScaler.from_calibration(self.config.get("calibration"))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EnsemblePredictor:
        folder = Path(folder)
        path = folder / ENSEMBLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (not an ensemble folder)")
        from matbalora.model_card import check_calibration, parse_card

        try:
            config = parse_card(path.read_text(encoding="utf-8"))
            names = config.get("members")
            if not isinstance(names, list) or not 2 <= len(names) <= 64 or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
                raise ValueError(f"members={names!r} must list 2-64 member folder names")
            check_calibration(config.get("calibration"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        members = [Predictor.load(folder / name) for name in names]
        return cls(members, config)

    @property
    def model(self) -> BandGapModel:
        return self.members[0].model

    def member_gaps(self, prep: Prepared) -> np.ndarray:
        """[K, n] deterministic predictions of each member."""
        return self.member_outputs(prep)[0]

    def member_outputs(self, prep: Prepared) -> tuple[np.ndarray, np.ndarray | None]:
        """[K, n] deterministic predictions of each member and, for members with a Gaussian NLL head,
        [K, n] their aleatoric variances (eV^2); None otherwise."""
        draws = [m.sample(prep, samples=0) for m in self.members]
        var = [d.aleatoric_var for d in draws]
        return np.stack([d.gaps[0] for d in draws]), None if any(v is None for v in var) else np.stack(var)

    def predict(self, structures, *, samples: int = 16, level: float = 0.9, ids: Sequence[str] | None = None, seed: int | None = 0) -> pd.DataFrame:
        """Same columns as :meth:`Predictor.predict`; ``samples`` is ignored (one pass per member)."""
        _check_level(level)
        return self.predict_prepared(prepare(self.model, structures, ids), level=level)

    def predict_prepared(self, prep: Prepared, *, samples: int = 16, level: float = 0.9, seed: int | None = 0) -> pd.DataFrame:
        # Lakshminarayanan et al. (2017): total variance = variance of member means + mean member variance
        gaps, var = self.member_outputs(prep)
        alea = np.sqrt(var.mean(0)) if var is not None else np.full(gaps.shape[1], np.nan)
        return _frame(prep, gaps.mean(0), gaps.std(0, ddof=1), alea, self.scaler, level)
