"""Batch prediction over many inputs: paths or structures in, DataFrame out.

``screen`` processes inputs in chunks with a progress bar and appends each finished chunk to
``out`` (CSV) in one write, so an interrupted screen loses nothing: run it again with the same
inputs, settings and ``out`` and it continues after the last complete row (a torn last record is
discarded); the file's settings record and lock are in ``matbalora.screen_output``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from matbalora.api import SHIPPED_ENSEMBLE, SHIPPED_MODEL, _resolve, load_ensemble, load_model
from matbalora.atomic import write_text
from matbalora.calibration import StdScaler
from matbalora.checkpoint import read_config, trained_state
from matbalora.data.dataset import Rejection
from matbalora.data.doubtful import NOTE, WARNING, ordered_item
from matbalora.data.readers import read_structures
from matbalora.data.validation import DEFAULT_MAX_ATOMS
from matbalora.defaults import LEVEL, SAMPLES
from matbalora.predict import COLUMNS, ENSEMBLE_FILE, EnsemblePredictor, Predictor, prepare
from matbalora.probabilities import check_window
from matbalora.screen_output import TEXT_COLUMNS, append_rows, check_settings, exclusive, of_other_inputs, read_rows, record_settings, to_csv_text

ENSEMBLE_COLUMNS = {"band_gap": "ens_band_gap", "std": "ens_std", "lower": "ens_lower", "upper": "ens_upper", "p_metal": "ens_p_metal", "p_window": "ens_p_window"}
#: Columns of ``predict_items`` (and of ``screen``'s and ``matbalora predict``'s files), before the ensemble's.
FILE_COLUMNS = [*COLUMNS, "note", "warning"]
#: How rows are drawn; recorded with a screen's settings so that a resume under another recipe is refused.
ROW_RECIPE = "draws seeded by the crystal key and seed"


def _predictor(model: Predictor | str | os.PathLike | None) -> Predictor:
    return model if isinstance(model, Predictor) else load_model(model)


def _ensemble(ensemble: EnsemblePredictor | str | os.PathLike | bool | None) -> EnsemblePredictor | None:
    if ensemble is None or ensemble is False:
        return None
    if isinstance(ensemble, EnsemblePredictor):
        return ensemble
    return load_ensemble(None if ensemble is True else ensemble)


def _items(inputs: Any, max_atoms: int = DEFAULT_MAX_ATOMS, *, order: bool = False) -> list[tuple[str, Any]]:
    """(id, Structure | Atoms | Rejection) for paths, structures, or a mix, in order. ``order``:
    disordered structures become ordered approximants (``matbalora.data.doubtful``)."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "lattice") or hasattr(inputs, "cell"):
        inputs = [inputs]
    items: list[tuple[str, Any]] = []
    inputs = list(inputs)
    if inputs and all(isinstance(obj, (str, os.PathLike)) for obj in inputs):
        # one call: files that share a name in different folders get their paths as ids
        return read_structures(inputs, max_atoms=max_atoms, order=order)
    for pos, obj in enumerate(inputs):
        if isinstance(obj, (str, os.PathLike)):
            try:
                items.extend(read_structures(obj, max_atoms=max_atoms, order=order))
            except FileNotFoundError:
                items.append((os.fspath(obj), Rejection(os.fspath(obj), "unreadable", "no such file or folder")))
            except ValueError as exc:
                items.append((os.fspath(obj), Rejection(os.fspath(obj), "unreadable", str(exc))))
        else:
            props = getattr(obj, "properties", None) or getattr(obj, "info", None) or {}
            sid = str(props.get("id", props.get("material_id", pos)))
            items.append((sid, ordered_item(sid, obj, max_atoms=max_atoms) if order else obj))
    return items


def _text(obj: Any, key: str) -> str:
    props = getattr(obj, "properties", None)
    value = props.get(key) if isinstance(props, dict) else None
    return "" if value is None else str(value)


def predict_items(
    items: Sequence[tuple[str, Any]], model: Predictor, ensemble: EnsemblePredictor | None, *, samples: int, level: float,
    seed: int | None = 0, max_atoms: int = DEFAULT_MAX_ATOMS, window: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """One row per item (``FILE_COLUMNS``, with ``p_window`` after ``p_metal`` when a ``window`` is
    given, then the ensemble's); rejected items keep their row with NaNs and the reason in ``error``;
    ``note`` says what was done to an input (an ordered approximant), ``warning`` what its parser
    warned about."""
    good = [(i, sid, obj) for i, (sid, obj) in enumerate(items) if not isinstance(obj, Rejection)]
    prep = prepare(model.model, [obj for _, _, obj in good], [sid for _, sid, _ in good], max_atoms=max_atoms)
    frame = model.predict_prepared(prep, samples=samples, level=level, seed=seed, window=window)
    if ensemble is not None:
        ens = ensemble.predict_prepared(prep, level=level, window=window)
        for src, dst in ENSEMBLE_COLUMNS.items():
            if src in ens:
                frame[dst] = ens[src].to_numpy()
    full = pd.DataFrame(index=range(len(items)), columns=frame.columns)
    full.loc[[i for i, _, _ in good], :] = frame.to_numpy() if len(frame) else None
    for i, (sid, obj) in enumerate(items):
        if isinstance(obj, Rejection):
            full.loc[i, "id"] = sid
            full.loc[i, "error"] = f"{obj.reason}: {obj.detail}" if obj.detail else obj.reason
    for col in ("formula", "error"):
        full[col] = full[col].fillna("")
    full.insert(full.columns.get_loc("error") + 1, "note", [_text(obj, NOTE) for _, obj in items])
    full.insert(full.columns.get_loc("note") + 1, "warning", [_text(obj, WARNING) for _, obj in items])
    numeric = [c for c in full.columns if c not in TEXT_COLUMNS]
    full[numeric] = full[numeric].apply(pd.to_numeric, errors="coerce")
    full["n_atoms"] = full["n_atoms"].astype("Int64")
    return full


def predict_paths(
    paths: Sequence[str], *, model=None, ensemble=None, samples: int = SAMPLES, level: float = LEVEL, strict: bool = False, order: bool = False,
    window: tuple[float, float] | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict files/folders; returns the frame of accepted inputs and ``(path_or_id, reason)`` of rejected ones."""
    items = _items(list(paths), order=order)
    rejections = [(sid, o) for sid, o in items if isinstance(o, Rejection)]
    # error lines name the input's path (``path#k`` for the k-th entry of a multi-structure file)
    rejected = [(o.source or o.id_or_path, f"{o.reason}: {o.detail}" if o.detail else o.reason) for _, o in rejections]
    if strict and rejected:
        return pd.DataFrame(columns=file_columns(window)), rejected[:1]
    frame = predict_items(items, _predictor(model), _ensemble(ensemble), samples=samples, level=level, window=window)
    failed = frame["error"] != ""
    already = {str(sid) for sid, _ in rejections}
    for sid, err in zip(frame.loc[failed, "id"], frame.loc[failed, "error"]):
        if sid not in already:
            rejected.append((str(sid), err))
    return frame[~failed].reset_index(drop=True), rejected


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``.csv`` (strings quoted, see ``screen_output.to_csv_text``) or ``.json`` (records) atomically."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        write_text(path, to_csv_text(frame, header=True))
    elif suffix == ".json":
        write_text(path, frame.to_json(orient="records", indent=1))
    else:
        raise ValueError(f"--out {os.fspath(path)!r}: use a .csv or .json file")


def _fingerprint(card: dict, scaler: Any, extra: Any = None) -> str:
    """sha256 of a model card (it names the weights' sha256) and the std recalibration in use."""
    text = json.dumps([card, [scaler.factor, scaler.floor], extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: Predictor | str | os.PathLike | None) -> str:
    """Content key of a model (a Predictor, or a model folder; None: the shipped one): its card, which names
    the weights' sha256, and its recalibration. Equal keys, equal predictions."""
    if isinstance(model, Predictor):
        card, scaler = model.config, model.scaler
        weights = None if card.get("weights") else {k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest() for k, v in trained_state(model.model).items()}
        return _fingerprint(card, scaler, weights)
    card = read_config(_resolve(model, SHIPPED_MODEL))
    return _fingerprint(card, StdScaler.from_calibration(card.get("calibration")))


def ensemble_fingerprint(ensemble: EnsemblePredictor | str | os.PathLike | bool | None) -> str | None:
    """Content key of an ensemble (an EnsemblePredictor, or its folder; True: the shipped one; None / False:
    none): its card, its recalibration and every member's :func:`model_fingerprint`."""
    if ensemble is None or ensemble is False:
        return None
    if isinstance(ensemble, EnsemblePredictor):
        return _fingerprint(ensemble.config, ensemble.scaler, [model_fingerprint(m) for m in ensemble.members])
    folder = _resolve(None if ensemble is True else ensemble, SHIPPED_ENSEMBLE)
    config = json.loads((folder / ENSEMBLE_FILE).read_text(encoding="utf-8"))
    members = [model_fingerprint(folder / name) for name in config.get("members", [])]
    return _fingerprint(config, StdScaler.from_calibration(config.get("calibration")), members)


def run_settings(model, ensemble, *, window: tuple[float, float] | None = None, **options: Any) -> dict[str, Any]:
    """Everything a screen's rows depend on, as recorded beside its output and compared on resume.
    ``window`` (eV) is recorded as ``[lo, hi]`` or None, so a resume with another window (or with one
    where the rows have none) is refused; a record without it counts as None (no ``p_window``)."""
    return {"rows": ROW_RECIPE, "model": model_fingerprint(model), "ensemble": ensemble_fingerprint(ensemble),
            "window": None if window is None else list(window), **options}


def file_columns(window: tuple[float, float] | None = None) -> list[str]:
    """``FILE_COLUMNS``, with ``p_window`` after ``p_metal`` when a window is asked for."""
    if window is None:
        return list(FILE_COLUMNS)
    k = FILE_COLUMNS.index("p_metal") + 1
    return [*FILE_COLUMNS[:k], "p_window", *FILE_COLUMNS[k:]]


def screen_columns(window: tuple[float, float] | None = None, *, ensemble: bool = False) -> list[str]:
    """The columns of a screen's rows: ``file_columns(window)``, then the ensemble's."""
    columns = file_columns(window)
    return columns + ([dst for src, dst in ENSEMBLE_COLUMNS.items() if src in columns] if ensemble else [])


def top_by_window(frame: pd.DataFrame, top: int | None) -> pd.DataFrame:
    """The rows of ``frame`` with a ``p_window``, highest first (ties in input order), the first ``top`` of them."""
    ranked = frame[frame["p_window"].notna()].sort_values("p_window", ascending=False, kind="stable")
    return (ranked if top is None else ranked.head(top)).reset_index(drop=True)


def screen(
    inputs: Iterable,
    *,
    model: Predictor | str | None = None,
    ensemble: EnsemblePredictor | str | bool | None = None,
    samples: int = SAMPLES,
    level: float = LEVEL,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int | None = 0,
    cluster: Any = None,
    retries: int = 2,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    order: bool = False,
    window: tuple[float, float] | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """Predict many inputs in chunks. ``ensemble``: None/False none, True the shipped one, or a folder.

    ``window=(lo, hi)`` eV adds ``p_window`` (probability that the gap lies in ``[lo, hi]``); with
    ``top=N`` the returned frame holds the N rows of highest ``p_window``, highest first (``out``
    still gets every row, in input order).

    With ``out`` (a .csv path), each chunk is appended as soon as it is done and a rerun resumes
    after the last complete row; a finished screen is not recomputed. The run settings (model and
    ensemble fingerprints, ``samples``, ``level``, ``seed``, ``batch_size``, ``max_atoms``,
    ``order``) are recorded beside ``out`` (``screen_output``) and a resume under other settings, or
    for other inputs, is refused; so is a second screen writing ``out`` while one runs. A crystal's
    Monte-Carlo draws depend only on the crystal (``crystal_key``) and ``seed``, so a resumed or
    distributed screen writes exactly the rows of an uninterrupted one (chunks are batched the same),
    and each row equals ``predict``'s for that crystal to float rounding (1e-6 eV).

    ``cluster``: a Dask ``distributed.Client``, a scheduler address (``'tcp://host:8786'``) or a
    cluster object: chunks run as tasks on its workers (``model``/``ensemble`` must then be folder
    paths or the shipped defaults, loaded once per worker), a failed chunk is rerun up to ``retries``
    times, and the rows are the same, in the same order, as without a cluster (see ``matbalora.cluster``).
    ``max_atoms``: larger structures are rejected (memory stays bounded by the row budget of
    ``BandGapModel.sample_gaps`` either way; the limit only bounds the time of one structure).
    ``order``: a disordered structure is predicted as an ordered approximant, said in its ``note``.
    """
    window = None if window is None else check_window(window)
    if top is not None and (window is None or isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top={top!r} needs a window and must be an integer >= 1")
    frame = _screen_all(inputs, model=model, ensemble=ensemble, samples=samples, level=level, batch_size=batch_size, out=out,
                        progress=progress, seed=seed, cluster=cluster, retries=retries, max_atoms=max_atoms, order=order, window=window)
    return frame if top is None else top_by_window(frame, top)


def _screen_all(inputs, *, model, ensemble, samples, level, batch_size, out, progress, seed, cluster, retries, max_atoms, order, window) -> pd.DataFrame:
    chunk = batch_size or 256
    if chunk < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix.lower() != ".csv":
        raise ValueError(f"out={os.fspath(out)!r}: screening appends rows, use a .csv file")
    rows = partial(_chunk_rows, model=model, ensemble=ensemble, cluster=cluster, retries=retries,
                   options={"samples": samples, "level": level, "max_atoms": max_atoms, "window": window})
    if out_path is None:
        return _screen(_items(inputs, max_atoms, order=order), rows, chunk=chunk, seed=seed, progress=progress, columns=file_columns(window))
    with exclusive(out_path):
        items = _items(inputs, max_atoms, order=order)
        settings = run_settings(model, ensemble, samples=samples, level=level, seed=seed, batch_size=chunk, max_atoms=max_atoms, order=order, window=window)
        done = read_rows(out_path)
        if done is None:
            record_settings(out_path, settings)
        else:
            check_settings(out_path, settings)
            if of_other_inputs(done, [sid for sid, _ in items]):
                raise ValueError(f"{out_path} holds rows of other inputs; use a new out file")
            expected = screen_columns(window, ensemble=ensemble is not None and ensemble is not False)
            if list(done.columns) != expected:
                raise ValueError(f"{out_path} has the columns of another version ({', '.join(done.columns)}); use a new out file")
        return _screen(items, rows, chunk=chunk, seed=seed, progress=progress, out=out_path, done=done, columns=file_columns(window))


def _screen(items: list, rows, *, chunk: int, seed: int | None, progress: bool, out: Path | None = None, done: pd.DataFrame | None = None,
            columns: list[str] = FILE_COLUMNS) -> pd.DataFrame:
    """The ``done`` rows, then those of the other ``items`` from ``rows(jobs)``, appended to ``out`` chunk by chunk."""
    n_done = 0 if done is None else len(done)
    # a crystal's draws depend on the crystal and the seed; the chunk holding row n_done is recomputed
    # whole (only its new rows are kept) so every chunk is batched as in an uninterrupted screen, which
    # keeps the float rounding of batched passes, and so the written rows, identical to the digit
    first = n_done // chunk * chunk
    jobs = [(items[start : start + chunk], seed) for start in range(first, len(items), chunk)] if n_done < len(items) else []
    frames = [done] if n_done else []
    skip = n_done - first
    bar = tqdm(total=len(items), initial=n_done, desc="screening", unit="crystal", disable=not progress)
    for part in rows(jobs):
        part, skip = part.iloc[skip:].reset_index(drop=True), 0
        if out is not None:
            append_rows(out, part, header=not frames)
        frames.append(part)
        bar.update(len(part))
    bar.close()
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)


def _chunk_rows(jobs: list, *, model, ensemble, options: dict, cluster: Any, retries: int) -> Iterator[pd.DataFrame]:
    """The rows of each (items, seed) job, in job order: here, or as tasks on a Dask cluster."""
    if not jobs:
        return
    if cluster is None:
        predictor, ens = _predictor(model), _ensemble(ensemble)
        for part_items, part_seed in jobs:
            yield predict_items(part_items, predictor, ens, seed=part_seed, **options)
        return
    from matbalora import cluster as dask_cluster

    model_dir = dask_cluster.folder_path(model, default=SHIPPED_MODEL, name="model")
    ens_dir = None if ensemble is None or ensemble is False else dask_cluster.folder_path(ensemble, default=SHIPPED_ENSEMBLE, name="ensemble")
    client, opened = dask_cluster.connect(cluster)
    try:
        calls = (((predict_items, model_dir, ens_dir, part_items), {"seed": part_seed, **options}) for part_items, part_seed in jobs)
        yield from dask_cluster.ordered_results(client, dask_cluster.predict_chunk, calls, retries=retries)
    finally:
        if opened:
            client.close()
