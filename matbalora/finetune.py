"""From a data file to a model folder: load, split, convert graphs once (cached), fine-tune,
recalibrate on the validation split, score the test split, and write the model card.

``train_model`` makes one model; ``train_ensemble`` makes K models on the same split with
different seeds (the deep-ensemble baseline) and an ``ensemble.json`` next to them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from matbalora.atomic import atomic_write, write_json
from matbalora.backbones import DEFAULT_BACKBONE
from matbalora.calibration import StdScaler, fit_recalibration
from matbalora.checkpoint import load_model_folder, save_model, with_adapters
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig, to_dict
from matbalora.data.readers import load_dataset
from matbalora.data.splits import Split, grouped_split, random_split
from matbalora.head import BandGapHead, gap_only_config
from matbalora.metrics import evaluate
from matbalora.model import BandGapModel
from matbalora.conformal import MondrianIntervals
from matbalora.defaults import METAL_THRESHOLD
from matbalora.predict import ENSEMBLE_FILE, EnsemblePredictor, Predictor, Prepared, summarize, to_frame
from matbalora.training import ListBatches, fit, out_of_fold_gaps, pooled_features_of, refit_head, refit_variance

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
#: training crystals whose pooled features the head refit uses (a seeded random subset: the pass over
#: all 83,000 of the full pool took 12+ minutes on a loaded 2-core machine; 20,000 is 5x the 4,000 of the
#: probe in issue 14 that first showed the head gain)
HEAD_REFIT_CRYSTALS = 20_000
#: epochs of each member of a separate variance head (``HeadConfig(variance="separate")``) after the
#: head refit: validation ranking of non-metal errors rose until 60-120 epochs (benchmarks/variance_study.py)
VARIANCE_REFIT_EPOCHS = 100


def default_cache_dir() -> Path:
    """``$MATBALORA_CACHE`` or ``~/.cache/matbalora`` (graphs are keyed by structure hash and backbone)."""
    return Path(os.environ.get("MATBALORA_CACHE", Path.home() / ".cache" / "matbalora"))


@dataclass(frozen=True)
class DataSpec:
    """Which data and which split a model is trained on."""

    path: str
    max_structures: int | None = None
    split: str = "random"  # random | grouped
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("random", "grouped"):
            raise ValueError(f"split={self.split!r}; choose 'random' or 'grouped'")
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction} must leave a training part")


@dataclass
class PreparedData:
    ids: list[str]
    formulas: list[str]
    n_atoms: list[int]
    targets: np.ndarray
    graphs: list
    split: Split
    provenance: dict
    #: (block, backbone checkpoint) -> graphs with frozen-prefix features in place of the split's graphs
    prefix_cache: dict = field(default_factory=dict, repr=False)

    def part(self, name: str) -> Prepared:
        idx = getattr(self.split, name).tolist()
        return Prepared(
            ids=[self.ids[i] for i in idx],
            formulas=[self.formulas[i] for i in idx],
            n_atoms=[self.n_atoms[i] for i in idx],
            errors=[""] * len(idx),
            graphs=[self.graphs[i] for i in idx],
            graph_rows=list(range(len(idx))),
        )


def prepare_data(spec: DataSpec, model: BandGapModel, *, split_file: Path | None, cache_dir: Path | None, workers: int = 1, progress: bool = True) -> PreparedData:
    """Load and validate the data, reuse or make the split, and convert graphs through the cache."""
    ds = load_dataset(spec.path, on_invalid="skip", max_structures=spec.max_structures, limits=model.family.limits(model.backbone))
    if ds.rejected:
        log.warning("%s: %d entries rejected %s", spec.path, len(ds.rejected), ds.rejection_counts())
    fractions = (1 - spec.val_fraction - spec.test_fraction, spec.val_fraction, spec.test_fraction)
    if split_file is not None and split_file.is_file():
        split = Split.load(split_file)
        if max(int(np.max(getattr(split, p), initial=-1)) for p in ("train", "val", "test")) >= len(ds):
            raise ValueError(f"{split_file} refers to entries beyond the {len(ds)} loaded from {spec.path}")
    elif spec.split == "random":
        split = random_split(len(ds), fractions=fractions, seed=spec.split_seed)
    else:
        split = grouped_split([s.composition.reduced_formula for s in ds.structures], fractions=fractions, seed=spec.split_seed)
    if split_file is not None and not split_file.is_file():
        split.save(split_file)
    graphs = structure_graphs(model, ds.structures, ds.ids, cache_dir=cache_dir, workers=workers, progress=progress)
    provenance = dict(ds.provenance, rejected=ds.rejection_counts(), n_loaded=len(ds))
    return PreparedData(
        ids=list(ds.ids),
        formulas=[s.composition.reduced_formula for s in ds.structures],
        n_atoms=[len(s) for s in ds.structures],
        targets=ds.targets,
        graphs=graphs,
        split=split,
        provenance=provenance,
    )


def structure_graphs(model: BandGapModel, structures: list, ids: list[str], *, cache_dir: Path | None, workers: int = 1, progress: bool = True) -> list:
    """The model's input graphs of ``structures``, as its backbone family converts them (through the
    family's on-disk graph cache where it has one, ``Backbone.graphs``)."""
    return model.family.graphs(model.backbone, structures, ids, cache_dir=cache_dir, workers=workers, progress=progress)


def with_frozen_prefix(data: PreparedData, model: BandGapModel, *, parts: tuple[str, ...] = ("train", "val", "test"), progress: bool = True) -> PreparedData:
    """``data`` with the graphs of the split ``parts`` replaced by their cached frozen-prefix features,
    when the model's backbone is frozen before its first adapted block (``Backbone.compute_prefixes``);
    otherwise ``data`` itself. Computed once per block and shared by every model trained on ``data``."""
    family = model.family
    block = family.prefix_block(model.backbone, model.method)
    if block == 0 or prefix_block_of(data) == block:  # nothing to cache, or cached already (e.g. read from a prefix store)
        return data
    key = (block, model.backbone_checkpoint, tuple(parts))
    if key not in data.prefix_cache:
        idx = sorted({int(i) for part in parts for i in getattr(data.split, part)})
        cached = family.compute_prefixes(model.backbone, [data.graphs[i] for i in idx], block, progress=progress)
        graphs = list(data.graphs)
        for i, p in zip(idx, cached):
            graphs[i] = p
        data.prefix_cache[key] = graphs
    return replace(data, graphs=data.prefix_cache[key])


def _metrics(frame, y_true: np.ndarray) -> dict:
    pred, std = frame["band_gap"].to_numpy(), frame["std"].to_numpy()
    if not np.all(np.isfinite(std)):
        std = np.zeros_like(pred)  # no uncertainty: only accuracy metrics are meaningful
        out = evaluate(pred, std, y_true)
        return {k: v for k, v in out.items() if not any(t in k for t in ("spearman", "nll", "calib", "ence", "coverage", "width", "sparsification"))}
    return evaluate(pred, std, y_true)


def calibrate_and_score(predictor, data: PreparedData, *, samples: int) -> tuple[dict, dict]:
    """Fit the std recalibration (scale and floor, :class:`StdScaler` with ``floor=True``), the
    marginal 90% conformal quantile (``conformal``, kept as a record) and the class-conditional
    conformal intervals that ``predict`` reports (``mondrian``, :class:`MondrianIntervals`) on the
    validation split; metrics on validation and test (test before and after recalibration, and
    ``test_classes``: coverage and width of the Gaussian and the Mondrian 90% intervals per
    predicted class and per true class). One prediction pass per split."""
    predictor.scaler, predictor.mondrian = StdScaler(1.0), None
    val_prep, y_val = data.part("val"), data.targets[data.split.val]
    val_draws = predictor.gap_draws(val_prep, samples=samples)
    val = to_frame(val_prep, val_draws, predictor.scaler, None, 0.9)
    calibration: dict = {"std_scale": 1.0, "std_floor": 0.0, "fitted_on": "val", "samples": samples}
    scaler, mondrian = predictor.scaler, None
    if np.all(np.isfinite(val["std"])):
        calibration.update(fit_recalibration(val["band_gap"], val["std"], y_val, level=0.9))
        scaler = StdScaler.from_calibration(calibration)
        cols = summarize(val_draws, scaler, None, 0.9)
        mondrian = MondrianIntervals.fit(cols["band_gap"], cols["std"], cols["p_metal"], y_val)
        calibration["mondrian"] = mondrian.to_dict()
    metrics = {"val": _metrics(val, y_val)}
    if len(data.split.test):
        test_prep, y_test = data.part("test"), data.targets[data.split.test]
        test_draws = predictor.gap_draws(test_prep, samples=samples)
        metrics["test_uncalibrated"] = _metrics(to_frame(test_prep, test_draws, StdScaler(1.0), None, 0.9), y_test)
        gaussian = to_frame(test_prep, test_draws, scaler, None, 0.9)
        metrics["test"] = _metrics(gaussian, y_test)
        if mondrian is not None:
            conformal = to_frame(test_prep, test_draws, scaler, mondrian, 0.9)
            metrics["test_classes"] = class_coverage(gaussian, conformal, y_test, mondrian)
            metrics["test"]["coverage_90_mondrian"] = metrics["test_classes"]["all"]["coverage_90_mondrian"]
            metrics["test"]["mean_interval_width_90_mondrian"] = metrics["test_classes"]["all"]["width_90_mondrian"]
    predictor.scaler, predictor.mondrian = scaler, mondrian
    return calibration, metrics


def class_coverage(gaussian, mondrian_frame, y_true: np.ndarray, mondrian: MondrianIntervals) -> dict:
    """Coverage and mean width (eV) of the 90% intervals of two frames of the same crystals (the
    Gaussian one, then the Mondrian one) on all crystals, per predicted class (``predicted <name>``)
    and per true class (``true metal``, ``true non-metal``, ``true 0-1`` ...)."""
    pred_class = mondrian.classify(mondrian_frame["band_gap"], mondrian_frame["p_metal"])
    true_range = 1 + np.searchsorted(mondrian.gap_edges, y_true, side="right")
    metal = y_true <= METAL_THRESHOLD
    groups = {"all": np.ones(len(y_true), bool)}
    groups |= {f"predicted {name}": pred_class == c for c, name in enumerate(mondrian.classes)}
    groups |= {"true metal": metal, "true non-metal": ~metal}
    groups |= {f"true {name}": ~metal & (true_range == c) for c, name in enumerate(mondrian.classes) if c}
    out = {}
    for name, mask in groups.items():
        row: dict = {"n": int(mask.sum())}
        for tag, frame in (("gaussian", gaussian), ("mondrian", mondrian_frame)):
            lo, hi = frame["lower"].to_numpy()[mask], frame["upper"].to_numpy()[mask]
            covered = (lo <= y_true[mask]) & (y_true[mask] <= hi)
            row[f"coverage_90_{tag}"] = float(covered.mean()) if mask.any() else None
            width = float(np.mean(hi - lo)) if mask.any() else math.nan
            row[f"width_90_{tag}"] = width if math.isfinite(width) else None  # [0, inf) intervals: a class too small for the level
        out[name] = row
    return out


def prefix_block_of(data: PreparedData) -> int:
    """The block the training graphs enter at (0: full CrystalGraphs)."""
    part = next((p for p in (data.split.train, data.split.val, data.split.test) if len(p)), None)
    first = data.graphs[int(part[0])] if part is not None else None
    return int(getattr(first, "block", 0))


def _command() -> str:
    return "matbalora " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if Path(sys.argv[0]).name == "matbalora" else shlex.join(sys.argv)


def train_model(
    spec: DataSpec | None,
    out: str | os.PathLike,
    *,
    train: TrainConfig,
    adapter: AdapterConfig | None = None,
    head: HeadConfig | None = None,
    resume: bool = False,
    cache_dir: str | os.PathLike | None = None,
    samples: int = 16,
    workers: int = 1,
    progress: bool = True,
    data: PreparedData | None = None,
    backbone: str = DEFAULT_BACKBONE,
    backbone_checkpoint: str | None = None,
    train_batches=None,
    init_from: str | os.PathLike | None = None,
) -> Path:
    """Fine-tune one model and write its folder (weights, config with model card, split).

    ``train_batches`` (e.g. :class:`~matbalora.backbones.prefix_store.StoreBatches` over an on-disk
    prefix store) replaces the training part of ``data``; ``data`` then holds validation and test.

    ``backbone`` names the family (a key of ``matbalora.backbones.BACKBONES``), ``backbone_checkpoint`` a checkpoint
    file of it (default: the one inside its wheel). Without an ``adapter``, LoRA/BaLoRA adapters go on
    that family's default targets.

    ``init_from`` (a model folder) warm-starts from that model's architecture and trained weights
    (``head`` and ``backbone`` are then taken from it): ``train.epochs`` more epochs with a fresh
    warm-up + cosine schedule (a warm restart). An ``adapter`` given with it widens the model's
    adapters (:func:`~matbalora.checkpoint.with_adapters`, e.g. into one more block), the added ones
    starting at B = 0 so that training starts from the folder's model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train.seed)
    if init_from is not None:
        model, init_card = load_model_folder(init_from)
        if model.method != train.method:
            raise ValueError(f"init_from={init_from}: a {model.method} model cannot warm-start {train.method} training")
        init = {"folder": str(init_from), "epochs_run": init_card.get("training", {}).get("epochs_run"),
                "previous_epochs": _previous_epochs(init_card)}
        if adapter is not None and adapter != model.adapter_config:
            model = with_adapters(model, adapter)
            init["widened_adapter"] = to_dict(adapter)
    else:
        model = BandGapModel.from_pretrained(train.method, adapter=adapter, head=head or HeadConfig(), checkpoint=backbone_checkpoint, backbone=backbone)
        init = None
    if data is None:
        if spec is None:
            raise ValueError("train_model needs a DataSpec or prepared data")
        data = prepare_data(spec, model, split_file=out / SPLIT_FILE, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), workers=workers, progress=progress)
    elif not (out / SPLIT_FILE).is_file():
        data.split.save(out / SPLIT_FILE)
    t0 = time.perf_counter()
    data = with_frozen_prefix(data, model, progress=progress)
    prefix_seconds = time.perf_counter() - t0
    if train_batches is None:
        train_batches = ([data.graphs[i] for i in data.split.train], data.targets[data.split.train])
    n_train = len(train_batches[0]) if isinstance(train_batches, tuple) else len(train_batches)
    history = fit(
        model,
        train_batches,
        ([data.graphs[i] for i in data.split.val], data.targets[data.split.val]),
        train,
        out_dir=out / "checkpoint",
        resume=resume,
        progress=progress,
    )
    head_refit = None
    if train.head_refit_epochs and not model.head_config.standardize:
        t1 = time.perf_counter()
        batches = train_batches if not isinstance(train_batches, tuple) else ListBatches(*train_batches)
        feats = pooled_features_of(model, batches, limit=HEAD_REFIT_CRYSTALS)
        val_feats = model.pooled_features([data.graphs[i] for i in data.split.val])
        val_y = torch.as_tensor(data.targets[data.split.val], dtype=torch.float32)
        head_refit = refit_head(model, feats, (val_feats, val_y), epochs=train.head_refit_epochs, seed=train.seed)
        if model.head_config.variance == "separate":  # its members learn the refitted gap's residuals
            head_refit["variance_refit"] = refit_variance(model.head, feats, (val_feats, val_y), epochs=VARIANCE_REFIT_EPOCHS, seed=train.seed)
        head_refit["seconds"] = time.perf_counter() - t1
    predictor = Predictor(model)
    calibration, metrics = calibrate_and_score(predictor, data, samples=samples if model.is_bayesian or model.has_dropout else 0)
    card = {
        "calibration": calibration,
        "data": {**data.provenance, "spec": to_dict(spec) if spec is not None else None, "n_train": n_train, "n_val": len(data.split.val), "n_test": len(data.split.test)},
        "split_file": SPLIT_FILE,
        "training": {
            "config": to_dict(train),
            "epochs_run": len(history["history"]),
            "best_val_mae": history["best_val_mae"],
            "history": history["history"],
            "train_seconds": sum(e["train_seconds"] for e in history["history"]),
            "wall_seconds_this_run": time.perf_counter() - t0,
            "frozen_prefix": {"block": prefix_block_of(data), "seconds": prefix_seconds},
            "head_refit": head_refit,
            "init_from": init,
            "total_epochs": len(history["history"]) + (init["previous_epochs"] if init else 0),
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "parameters": model.parameter_counts(),
        },
        "metrics": metrics,
        "command": _command(),
    }
    save_model(model, out, extra=card)
    log.info("saved %s (test MAE %s)", out, metrics.get("test", {}).get("mae"))
    return out


def refit_variance_of(source: str | os.PathLike, out: str | os.PathLike, *, data: PreparedData, train_batches, members: int = 5,
                      epochs: int = VARIANCE_REFIT_EPOCHS, crystals: int = HEAD_REFIT_CRYSTALS, samples: int = 16, seed: int = 0) -> Path:
    """Model folder ``out``: the model of folder ``source`` with its head's variance replaced by
    ``members`` separate MLPs (:meth:`BandGapHead.with_separate_variance`; the gap and the adapters
    stay as they are) trained by :func:`~matbalora.training.refit_variance` on the pooled features of
    ``crystals`` training crystals of ``train_batches`` (the seeded subset the head refit uses), then
    recalibrated on ``data``'s validation part and scored on its test part. The card is ``source``'s
    with the new calibration, metrics and command, and the refit under ``training.variance_refit``."""
    out = Path(out)
    model, card = load_model_folder(source)
    t0 = time.perf_counter()
    model.head = model.head.with_separate_variance(members)
    model.head_config = model.head.config
    feats, val = _refit_features(model, out, data, train_batches, crystals)
    info = refit_variance(model.head, feats, val, epochs=epochs, seed=seed)
    info |= {"source": str(source), "seconds": time.perf_counter() - t0}
    return _save_refit(model, card, source, out, data, samples, {"variance_refit": info})


def rehead_of(source: str | os.PathLike, out: str | os.PathLike, *, data: PreparedData, train_batches, head: HeadConfig,
              epochs: int = 100, lr: float = 3e-4, patience: int = 20, members: int = 5, variance_hidden: int = 64, variance_layers: int = 2,
              variance_epochs: int = VARIANCE_REFIT_EPOCHS, variance_folds: int = 0, fold_epochs: int = 40,
              crystals: int | None = None, draw_crystals: int = 0, draws: int = 2, gap_members: int = 1, bootstrap: bool = False, samples: int = 16,
              seed: int = 0) -> Path:
    """Model folder ``out``: the adapters of folder ``source`` with a new gap head of config ``head``
    (say, wider than the source's) trained by L1 from a fresh initialisation on the frozen pooled
    features of ``crystals`` training crystals of ``train_batches`` (:func:`~matbalora.training.refit_head`,
    the epoch of lowest validation MAE kept), then ``members`` separate variance MLPs of
    ``variance_hidden`` x ``variance_layers`` fitted to its residuals on the same crystals
    (:func:`~matbalora.training.refit_variance`), recalibrated on ``data``'s validation part and scored on
    its test part. ``variance_folds`` >= 2: the variance MLPs learn from out-of-fold residuals instead
    (:func:`~matbalora.training.out_of_fold_gaps`, heads of the same config trained ``fold_epochs`` epochs
    on the other folds): a wide head fits its own training crystals more closely than unseen ones, and
    in-sample residuals then teach the variance too-small errors (``benchmarks/oof_variance_probe.py``).
    ``draw_crystals`` > 0 (BaLoRA sources): the gap head also learns from ``draws`` adapter draws of that
    many of the training crystals (their pooled features, ``draws`` rows each, beside the posterior-mean
    rows of all): predictions average the head over draws, and a head that saw only the posterior mean
    answers drawn features erratically (MgO: 16-draw gap 2.37 eV, posterior mean 4.41, PBE 4.44); the
    variance MLPs still learn from the posterior-mean rows.
    ``gap_members`` > 1: that many gap heads from seeds ``seed``, ``seed + 1``, ... on the same rows
    (:func:`_fit_gap_heads`), joined by :meth:`BandGapHead.with_gap_members`: the gap is their mean,
    their spread an epistemic part beside the adapter draws, and the variance MLPs learn the
    residuals of their mean; ``bootstrap``: each of them on its own resample of the rows (bagging).
    The passes over the training crystals resume after a kill (keyed by the source weights).
    ``head.pooling`` must be the source's: the features are the source's pooled atom features. ``lr``:
    at refit_head's default of 1e-3 a 512 x 3 head on all 82,111 full-pool crystals collapsed in its
    second epoch to a near-constant gap (validation MAE 0.298 -> 1.233, never recovering); at 3e-4 it
    trained smoothly."""
    out = Path(out)
    model, card = load_model_folder(source)
    if head.pooling != model.head_config.pooling:
        raise ValueError(f"head.pooling={head.pooling!r}: the features of {source} are pooled by {model.head_config.pooling!r}")
    t0 = time.perf_counter()
    (x, y), val = _refit_features(model, out, data, train_batches, crystals)
    gap_rows = (x, y)
    if draw_crystals:
        drawn = _training_features(model, out, train_batches, draw_crystals, draws=draws, seed=seed)
        gap_rows = (torch.cat([x, drawn[0]]), torch.cat([y, drawn[1]]))
    heads, fits = _fit_gap_heads(model, out, gap_rows, val, head, members=gap_members, epochs=epochs, lr=lr, patience=patience, seed=seed,
                                 bootstrap=bootstrap)
    model.head = heads[0].with_gap_members(heads[1:]) if gap_members > 1 else heads[0]
    model.head_config = model.head.config
    fitted = fits[0] | {"lr": lr}
    if gap_members > 1:
        fitted |= {"gap_members": [{k: f[k] for k in ("val_mae_after", "epochs_run")} | {"seed": seed + k} for k, f in enumerate(fits)]}
    if bootstrap:
        fitted |= {"bootstrap": True}
    if draw_crystals:
        fitted |= {"drawn_rows": len(gap_rows[1]) - len(y), "draws": draws}
    gap_config = heads[0].config
    model.head = model.head.with_separate_variance(members, hidden=variance_hidden, layers=variance_layers)
    model.head_config = model.head.config
    target = y
    if variance_folds:  # residuals y - own gap = y - out-of-fold gap
        oof = kept_out_of_fold_gaps(model, out.parent, gap_config, x, y, folds=variance_folds, epochs=fold_epochs, lr=lr)
        with torch.no_grad():
            target = y - oof + model.head(x)["gap"]
    variance = refit_variance(model.head, (x, target), val, epochs=variance_epochs, seed=seed)
    variance |= {"residuals": f"out of {variance_folds} folds, {fold_epochs} epochs each" if variance_folds else "in-sample"}
    info = {"source": str(source), "crystals": len(y), "head": to_dict(model.head_config), "head_refit": fitted,
            "variance_refit": variance, "seconds": time.perf_counter() - t0}
    return _save_refit(model, card, source, out, data, samples, {"rehead": info})


def _fit_gap_heads(model: BandGapModel, out: Path, rows: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], head: HeadConfig,
                   *, members: int, epochs: int, lr: float, patience: int, seed: int, bootstrap: bool = False) -> tuple[list[BandGapHead], list[dict]]:
    """``members`` gap heads of config ``head`` (L1, no variance), each from a fresh initialisation of
    seed ``seed + k``, inputs standardised on ``rows`` when ``head.standardize``, trained by
    :func:`~matbalora.training.refit_head` on ``rows`` (the epoch of lowest validation MAE kept), and
    their fit histories. ``bootstrap``: each head learns from its own resample of ``rows`` (as many rows,
    drawn with replacement by seed ``seed + k``; bagging), for members that differ in their data as well
    as their initialisation. Each fitted head is kept next to ``out`` (``.gaphead_<key>.pt``, keyed by the
    features, rows, validation crystals, config and settings), so a killed rehead resumes after its
    last fitted head, and a rehead that adds members reuses the ones it shares (:func:`kept_result`)."""
    config = gap_only_config(head)
    # the rows they are fitted on, and the validation crystals they are chosen on (by their gaps: their
    # features follow from the model's, and are recomputed in the last bits differently on other threads)
    digest = hashlib.sha256()
    for t in (*rows, val[1]):
        digest.update(t.detach().contiguous().numpy().tobytes())
    common = f"{features_fingerprint(model)}:{digest.hexdigest()}:{to_dict(config)}:{epochs}:{lr}:{patience}"
    heads, fits = [], []
    for k in range(members):

        def fit_one(k: int = k) -> dict:
            own = rows
            if bootstrap:
                pick = torch.randint(len(rows[1]), (len(rows[1]),), generator=torch.Generator().manual_seed(seed + k))
                own = (rows[0][pick], rows[1][pick])
            torch.manual_seed(seed + k)
            model.head = BandGapHead(own[0].shape[1], config)
            if config.standardize:
                model.head.set_input_statistics(own[0].mean(0), own[0].std(0))
            model.head_config = model.head.config
            fit_info = refit_head(model, own, val, epochs=epochs, lr=lr, patience=patience, seed=seed + k)
            return {"state": model.head.state_dict(), "fit": fit_info}

        saved = kept_result(out.parent, "gaphead", f"{common}:{seed + k}" + (":bootstrap" if bootstrap else ""), fit_one)
        heads.append(BandGapHead(rows[0].shape[1], config))
        heads[-1].load_state_dict(saved["state"])
        heads[-1].eval()
        fits.append(saved["fit"])
    return heads, fits


def kept_out_of_fold_gaps(model: BandGapModel, folder: Path, config: HeadConfig, x: torch.Tensor, y: torch.Tensor, *, folds: int, epochs: int,
                          lr: float) -> torch.Tensor:
    """:func:`~matbalora.training.out_of_fold_gaps`, kept in ``folder`` (``.oofgaps_<key>.pt``, keyed by
    ``model``'s features, the rows and the settings): the folds take ~12 min on the full pool."""
    digest = hashlib.sha256(x.contiguous().numpy().tobytes() + y.contiguous().numpy().tobytes()).hexdigest()
    key = f"{features_fingerprint(model)}:{digest}:{to_dict(config)}:{folds}:{epochs}:{lr}"
    return kept_result(folder, "oofgaps", key, lambda: {"gaps": out_of_fold_gaps(config, x, y, folds=folds, epochs=epochs, lr=lr)})["gaps"]


def kept_result(folder: Path, kind: str, key: str, compute) -> dict:
    """``compute()`` (a dict of tensors and plain values), or what an earlier call with the same ``key``
    saved in ``folder`` (``.<kind>_<sha256(key)[:24]>.pt``, written atomically)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = Path(folder) / f".{kind}_{digest[:24]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == digest:
            return saved["value"]
    value = compute()
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"key": digest, "value": value}, tmp))
    return value


def _refit_features(model: BandGapModel, out: Path, data: PreparedData, train_batches,
                    crystals: int | None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(pooled features, gaps) of ``crystals`` training crystals (:func:`_training_features`) and of the
    validation part (posterior mean)."""
    feats = _training_features(model, out, train_batches, crystals)
    val = ([data.graphs[i] for i in data.split.val], torch.as_tensor(data.targets[data.split.val], dtype=torch.float32))
    return feats, (model.pooled_features(val[0]), val[1])


def features_fingerprint(model: BandGapModel) -> str:
    """sha256 of everything but the head in ``model``'s state (backbone and adapters: what its pooled
    features depend on), names, dtypes and shapes included."""
    return state_fingerprint({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _training_features(model: BandGapModel, out: Path, train_batches, crystals: int | None, *,
                       draws: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, gaps) of ``crystals`` training crystals (all: None; ``draws`` > 0: that many
    adapter draws of each, :func:`~matbalora.training.pooled_features_of`): a pass over the whole pool
    is ~1 h on one core, so it checkpoints to ``out``'s folder, resumes, and stays there as a cache that
    the other refits of the same source weights and crystals reuse
    (``.pooled_<features_fingerprint>_<crystals>[_draws<k>_seed<s>].pt``: models that differ only in
    their head share it)."""
    batches = train_batches if not isinstance(train_batches, tuple) else ListBatches(*train_batches)
    weights = features_fingerprint(model)
    # which crystals and how they are pooled belong to the key too: the cache outlives the run
    key = f"{weights}:{batches.fingerprint()}:{model.head_config.pooling}"
    name = f".pooled_{weights[:16]}_{crystals or 'all'}" + (f"_draws{draws}_seed{seed}" if draws else "")
    return pooled_features_of(model, batches, limit=crystals, checkpoint=out.parent / f"{name}.pt", key=key, keep=True, draws=draws, seed=seed)


def _save_refit(model: BandGapModel, card: dict, source: str | os.PathLike, out: Path, data: PreparedData, samples: int, training: dict) -> Path:
    """Recalibrate a refitted ``model`` on the validation part, score the test part, and save it to
    ``out`` with ``source``'s card, its ``training`` section extended by ``training``."""
    calibration, metrics = calibrate_and_score(Predictor(model), data, samples=samples if model.is_bayesian or model.has_dropout else 0)
    kept = {k: v for k, v in card.items() if k not in ("format", "format_version", "backbone", "method", "adapter", "head", "weights")}
    # the source's own head and variance refits describe a head this model no longer has
    stale = ("head_refit", "variance_refit") if "rehead" in training else ()
    kept["training"] = {**{k: v for k, v in kept.get("training", {}).items() if k not in stale}, **training, "parameters": model.parameter_counts()}
    save_model(model, out, extra={**kept, "calibration": calibration, "metrics": metrics, "command": _command()})
    split = Path(source) / card.get("split_file", SPLIT_FILE)
    if split.is_file():
        (out / SPLIT_FILE).write_bytes(split.read_bytes())
    log.info("saved %s (refit of %s; test MAE %s)", out, source, metrics.get("test", {}).get("mae"))
    return out


def _previous_epochs(card: dict) -> int:
    """Epochs behind a model folder, its own warm starts included."""
    training = card.get("training", {})
    return int(training.get("total_epochs", training.get("epochs_run", 0)) or 0)


def train_ensemble(spec: DataSpec, out: str | os.PathLike, *, members: int, train: TrainConfig, seeds: list[int] | None = None, **kwargs) -> Path:
    """K models (default LoRA) on one split with different seeds, plus ``ensemble.json``; ``kwargs``
    go to :func:`train_model` (the graphs are those of its ``backbone`` and ``backbone_checkpoint``)."""
    if members < 2:
        raise ValueError(f"members={members} must be >= 2 for an ensemble")
    out = Path(out)
    seeds = seeds or [train.seed + k for k in range(members)]
    names = [f"member_{k}" for k in range(members)]
    data = kwargs.pop("data", None)
    for name, seed in zip(names, seeds):
        if (out / name / "config.json").is_file() and kwargs.get("resume"):
            continue  # finished member
        if data is None:
            torch.manual_seed(seed)
            probe = BandGapModel.from_pretrained("head", checkpoint=kwargs.get("backbone_checkpoint"), backbone=kwargs.get("backbone", DEFAULT_BACKBONE))
            cache = kwargs.get("cache_dir")
            data = prepare_data(spec, probe, split_file=out / SPLIT_FILE, cache_dir=Path(cache) if cache else default_cache_dir(), workers=kwargs.get("workers", 1), progress=kwargs.get("progress", True))
        train_model(spec, out / name, train=replace(train, seed=seed), data=data, **kwargs)
    ensemble = EnsemblePredictor([Predictor.load(out / n) for n in names])
    if data is None:
        data = prepare_data(spec, ensemble.model, split_file=out / SPLIT_FILE, cache_dir=Path(kwargs["cache_dir"]) if kwargs.get("cache_dir") else default_cache_dir(), progress=False)
    calibration, metrics = calibrate_and_score(ensemble, data, samples=0)
    write_json(out / ENSEMBLE_FILE, {"members": names, "seeds": seeds, "method": train.method, "calibration": calibration, "metrics": metrics, "data": {"spec": to_dict(spec) if spec is not None else None, "n_train": len(data.split.train), "n_val": len(data.split.val), "n_test": len(data.split.test)}, "command": _command()})
    return out
