"""Predictions with uncertainty as DataFrames: one BaLoRA (or LoRA) model, or a deep ensemble.

Columns (eV): ``id, formula, n_atoms, band_gap, std, lower, upper, p_metal, std_epistemic, std_aleatoric, error``
(and ``p_window`` after ``p_metal`` when a ``window`` is asked for).
``std`` is the total standard deviation (epistemic from the Monte-Carlo draws or ensemble members,
plus aleatoric where the head learned one), recalibrated as ``sqrt((k std)^2 + c^2)`` with the scale
``k`` and floor ``c`` fitted on the validation split when the model folder records them
(:class:`matbalora.calibration.StdScaler`; ``std_epistemic``/``std_aleatoric`` stay raw).
``lower``/``upper`` is the interval at ``level``, clipped at 0 eV: the class-conditional (Mondrian)
conformal interval ``band_gap +- q_c std`` when the card's calibration holds one
(:class:`matbalora.conformal.MondrianIntervals`: 90 % for predicted metals and for each predicted
gap range separately), otherwise (cards written before it) the central Gaussian interval of
N(band_gap, std^2). ``p_metal`` (gap <= ``METAL_THRESHOLD`` eV) and ``p_window`` (gap in
``[lo, hi]`` eV) come from the draws or members, each widened so that their mixture has the mean
``band_gap`` and the std ``std`` (:mod:`matbalora.probabilities`). Inputs that fail validation
keep their row, with NaN numbers and the reason in ``error``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from matbalora import probabilities
from matbalora.calibration import StdScaler, check_level, gaussian_interval
from matbalora.checkpoint import load_model_folder
from matbalora.conformal import MondrianIntervals
from matbalora.data.crystal_key import crystal_key
from matbalora.data.validation import DEFAULT_MAX_ATOMS, check_structure
from matbalora.defaults import LEVEL, SAMPLES
from matbalora.model import BandGapModel, GapSamples

COLUMNS = ["id", "formula", "n_atoms", "band_gap", "std", "lower", "upper", "p_metal", "std_epistemic", "std_aleatoric", "error"]
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
    #: per graph: the crystal's key (``crystal_key``), which seeds its draws; empty: positional draws
    keys: list[str] = field(default_factory=list)


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
    limits = model.family.limits(model.backbone)  # the cutoffs and elements of this model's backbone
    keyed = model.draws_follow_keys  # only then do keys seed the draws (not for LoRA members, MC dropout)
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
        found = check_structure(struct, max_atoms=max_atoms, limits=limits)
        reason = None if found is None else f"{found[0]}: {found[1]}"
        if reason is None:
            try:
                graph = model.structure_to_graph(struct, graph_id=sid)
                key = crystal_key(struct) if keyed else None  # before appending: graphs and keys stay in step
                prep.graphs.append(graph), prep.graph_rows.append(row)
                if keyed:
                    prep.keys.append(key)
            except Exception as exc:  # the converter rejects e.g. isolated atoms
                reason = f"graph conversion failed: {exc}"
        prep.errors.append(reason or "")
    return prep


def raw_total_std(epistemic: np.ndarray, aleatoric: np.ndarray) -> np.ndarray:
    """Epistemic and aleatoric std combined, before recalibration; NaN where both are NaN (eV)."""
    total = np.hypot(np.nan_to_num(epistemic), np.nan_to_num(aleatoric))
    total[np.isnan(epistemic) & np.isnan(aleatoric)] = np.nan
    return total


def intervals(band_gap: np.ndarray, std: np.ndarray, p_metal: np.ndarray, level: float, mondrian: MondrianIntervals | None) -> tuple[np.ndarray, np.ndarray]:
    """The one interval ``(lower, upper)`` eV of the predictions: Mondrian conformal when the card has it,
    else the central Gaussian interval of N(band_gap, std^2); both clipped at 0 eV."""
    if mondrian is None:
        return gaussian_interval(band_gap, std, level)
    return mondrian.interval(band_gap, std, p_metal, level)


def summarize(draws: GapSamples, scaler: StdScaler, mondrian: MondrianIntervals | None, level: float,
              window: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """Columns (``[n]`` each, eV) of the crystals of ``draws`` (``gaps`` [S, n]; S > 1 gives an
    epistemic spread): band_gap, std, lower, upper, p_metal (and p_window), std_epistemic, std_aleatoric."""
    gaps = draws.gaps
    mean = gaps.mean(0)
    epi = gaps.std(0, ddof=1) if gaps.shape[0] > 1 else np.full(mean.shape, np.nan)
    alea = np.sqrt(draws.aleatoric_var) if draws.aleatoric_var is not None else np.full(mean.shape, np.nan)
    std = scaler.transform(raw_total_std(epi, alea))  # recalibrated on validation: sqrt((k total)^2 + floor^2)
    p_metal = probabilities.p_metal(gaps, std)
    p_class = p_metal if mondrian is None or mondrian.metal_threshold == probabilities.METAL_THRESHOLD else probabilities.p_metal(gaps, std, threshold=mondrian.metal_threshold)
    lower, upper = intervals(mean, std, p_class, level, mondrian)
    cols = {"band_gap": mean, "std": std, "lower": lower, "upper": upper, "p_metal": p_metal}
    if window is not None:
        cols["p_window"] = probabilities.p_window(gaps, std, window)
    return cols | {"std_epistemic": epi, "std_aleatoric": alea}


def to_frame(prep: Prepared, draws: GapSamples, scaler: StdScaler, mondrian: MondrianIntervals | None, level: float,
           window: tuple[float, float] | None = None) -> pd.DataFrame:
    n = len(prep.ids)
    rows = np.asarray(prep.graph_rows, dtype=int)
    cols = {}
    for name, values in summarize(draws, scaler, mondrian, level, window).items():
        cols[name] = np.full(n, np.nan)
        cols[name][rows] = values
    columns = list(COLUMNS)
    if window is not None:
        columns.insert(columns.index("p_metal") + 1, "p_window")
    return pd.DataFrame({"id": prep.ids, "formula": prep.formulas, "n_atoms": prep.n_atoms, **cols, "error": prep.errors}, columns=columns)


def _check_window(window) -> tuple[float, float] | None:
    return None if window is None else probabilities.check_window(window)


class Predictor:
    """A trained band-gap model with its card; ``predict`` gives the DataFrame described above."""

    def __init__(self, model: BandGapModel, config: dict | None = None) -> None:
        self.model = model
        self.config = config or {}
        self.scaler = StdScaler.from_calibration(self.config.get("calibration"))
        self.mondrian = MondrianIntervals.from_calibration(self.config.get("calibration"))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Predictor:
        model, config = load_model_folder(folder)
        return cls(model, config)

    @property
    def card(self) -> dict:
        return self.config

    def predict(self, structures, *, samples: int = SAMPLES, level: float = LEVEL, ids: Sequence[str] | None = None, seed: int | None = 0, max_atoms: int = DEFAULT_MAX_ATOMS,
                window: tuple[float, float] | None = None) -> pd.DataFrame:
        """Structures/Atoms in, one row per input in input order. ``samples=0``: posterior mean only.
        Structures above ``max_atoms`` are rejected (their row says so). ``window=(lo, hi)`` eV adds
        ``p_window``, the probability that the gap lies in ``[lo, hi]``."""
        check_level(level)
        _check_window(window)
        prep = prepare(self.model, structures, ids, max_atoms=max_atoms)
        return self.predict_prepared(prep, samples=samples, level=level, seed=seed, window=window)

    def sample(self, prep: Prepared, *, samples: int, seed: int | None = 0):
        keys = prep.keys if len(prep.keys) == len(prep.graphs) and prep.keys else None
        return self.model.sample_gaps(prep.graphs, samples=samples, seed=seed, keys=keys)

    def gap_draws(self, prep: Prepared, *, samples: int = SAMPLES, seed: int | None = 0) -> GapSamples:
        """The predictive draws of ``prep``'s valid crystals (``gaps`` [S, n] eV)."""
        return self.sample(prep, samples=samples, seed=seed)

    def predict_prepared(self, prep: Prepared, *, samples: int = SAMPLES, level: float = LEVEL, seed: int | None = 0,
                         window: tuple[float, float] | None = None) -> pd.DataFrame:
        check_level(level)
        window = _check_window(window)
        return to_frame(prep, self.gap_draws(prep, samples=samples, seed=seed), self.scaler, self.mondrian, level, window)


class EnsemblePredictor:
    """Deep ensemble of independently trained models: mean and spread of member predictions."""

    def __init__(self, members: Sequence[Predictor], config: dict | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = list(members)
        self.config = config or {}
        self.scaler = StdScaler.from_calibration(self.config.get("calibration"))
        self.mondrian = MondrianIntervals.from_calibration(self.config.get("calibration"))

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
        """[K, n] deterministic predictions of each member (the mean of its gap heads where it has several) and, for members with a Gaussian NLL head,
        [K, n] their aleatoric variances (eV^2); None otherwise."""
        draws = [m.sample(prep, samples=0) for m in self.members]
        var = [d.aleatoric_var for d in draws]
        return np.stack([d.gaps.mean(0) for d in draws]), None if any(v is None for v in var) else np.stack(var)

    def predict(self, structures, *, samples: int = SAMPLES, level: float = LEVEL, ids: Sequence[str] | None = None, seed: int | None = 0,
                window: tuple[float, float] | None = None) -> pd.DataFrame:
        """Same columns as :meth:`Predictor.predict`; ``samples`` is ignored (one pass per member)."""
        check_level(level)
        _check_window(window)
        return self.predict_prepared(prepare(self.model, structures, ids), level=level, window=window)

    def gap_draws(self, prep: Prepared, *, samples: int = SAMPLES, seed: int | None = 0) -> GapSamples:
        """The members' predictions (``gaps`` [K, n] eV: one row per gap head of each member, so a
        member with several heads adds their spread too) and their mean aleatoric variance."""
        # Lakshminarayanan et al. (2017): total variance = variance of member means + mean member variance
        draws = [m.sample(prep, samples=0) for m in self.members]
        var = [d.aleatoric_var for d in draws]
        return GapSamples(np.concatenate([d.gaps for d in draws]), None if any(v is None for v in var) else np.stack(var).mean(0))

    def predict_prepared(self, prep: Prepared, *, samples: int = SAMPLES, level: float = LEVEL, seed: int | None = 0,
                         window: tuple[float, float] | None = None) -> pd.DataFrame:
        check_level(level)
        window = _check_window(window)
        return to_frame(prep, self.gap_draws(prep), self.scaler, self.mondrian, level, window)
