"""Batch prediction over many inputs: paths or structures in, DataFrame out.

``screen`` processes inputs in chunks with a progress bar and appends each finished chunk to
``out`` (CSV) in one write, so an interrupted screen loses nothing: run it again with the same
inputs and ``out`` and it continues after the last complete row (a torn last line is discarded).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from matbalora.api import SHIPPED_ENSEMBLE, SHIPPED_MODEL, load_ensemble, load_model
from matbalora.atomic import write_text
from matbalora.data.dataset import Rejection
from matbalora.data.readers import read_structures
from matbalora.data.validation import DEFAULT_MAX_ATOMS
from matbalora.predict import COLUMNS, EnsemblePredictor, Predictor, prepare

ENSEMBLE_COLUMNS = {"band_gap": "ens_band_gap", "std": "ens_std", "lower": "ens_lower", "upper": "ens_upper"}


def _predictor(model: Predictor | str | os.PathLike | None) -> Predictor:
    return model if isinstance(model, Predictor) else load_model(model)


def _ensemble(ensemble: EnsemblePredictor | str | os.PathLike | bool | None) -> EnsemblePredictor | None:
    if ensemble is None or ensemble is False:
        return None
    if isinstance(ensemble, EnsemblePredictor):
        return ensemble
    return load_ensemble(None if ensemble is True else ensemble)


def _items(inputs: Any, max_atoms: int = DEFAULT_MAX_ATOMS) -> list[tuple[str, Any]]:
    """(id, Structure | Atoms | Rejection) for paths, structures, or a mix, in order."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "lattice") or hasattr(inputs, "cell"):
        inputs = [inputs]
    items: list[tuple[str, Any]] = []
    for pos, obj in enumerate(inputs):
        if isinstance(obj, (str, os.PathLike)):
            try:
                items.extend(read_structures(obj, max_atoms=max_atoms))
            except (ValueError, FileNotFoundError) as exc:
                items.append((os.fspath(obj), Rejection(os.fspath(obj), "unreadable", str(exc))))
        else:
            props = getattr(obj, "properties", None) or getattr(obj, "info", None) or {}
            items.append((str(props.get("id", props.get("material_id", pos))), obj))
    return items


def predict_items(
    items: Sequence[tuple[str, Any]], model: Predictor, ensemble: EnsemblePredictor | None, *, samples: int, level: float,
    seed: int | None = 0, max_atoms: int = DEFAULT_MAX_ATOMS,
) -> pd.DataFrame:
    """One row per item; rejected items keep their row with NaNs and the reason in ``error``."""
    good = [(i, sid, obj) for i, (sid, obj) in enumerate(items) if not isinstance(obj, Rejection)]
    prep = prepare(model.model, [obj for _, _, obj in good], [sid for _, sid, _ in good], max_atoms=max_atoms)
    frame = model.predict_prepared(prep, samples=samples, level=level, seed=seed)
    if ensemble is not None:
        ens = ensemble.predict_prepared(prep, level=level)
        for src, dst in ENSEMBLE_COLUMNS.items():
            frame[dst] = ens[src].to_numpy()
    full = pd.DataFrame(index=range(len(items)), columns=frame.columns)
    full.loc[[i for i, _, _ in good], :] = frame.to_numpy() if len(frame) else None
    for i, (sid, obj) in enumerate(items):
        if isinstance(obj, Rejection):
            full.loc[i, "id"] = sid
            full.loc[i, "error"] = f"{obj.reason}: {obj.detail}" if obj.detail else obj.reason
    full["error"] = full["error"].fillna("")
    numeric = [c for c in full.columns if c not in ("id", "formula", "error")]
    full[numeric] = full[numeric].apply(pd.to_numeric, errors="coerce")
    return full


def predict_paths(paths: Sequence[str], *, model=None, ensemble=None, samples: int = 16, level: float = 0.9, strict: bool = False) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict files/folders; returns the frame of accepted inputs and ``(path_or_id, reason)`` of rejected ones."""
    items = _items(list(paths))
    rejected = [(o.id_or_path, f"{o.reason}: {o.detail}" if o.detail else o.reason) for _, o in items if isinstance(o, Rejection)]
    if strict and rejected:
        return pd.DataFrame(columns=COLUMNS), rejected[:1]
    frame = predict_items(items, _predictor(model), _ensemble(ensemble), samples=samples, level=level)
    failed = frame["error"] != ""
    already = {r[0] for r in rejected}
    for sid, err in zip(frame.loc[failed, "id"], frame.loc[failed, "error"]):
        if sid not in already:
            rejected.append((str(sid), err))
    return frame[~failed].reset_index(drop=True), rejected


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``.csv`` or ``.json`` (records) atomically."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        write_text(path, frame.to_csv(index=False))
    elif suffix == ".json":
        write_text(path, frame.to_json(orient="records", indent=1))
    else:
        raise ValueError(f"--out {os.fspath(path)!r}: use a .csv or .json file")


def _completed_rows(out: Path, chunk: int, ids: Sequence[str]) -> pd.DataFrame | None:
    """Rows of the complete chunks already in ``out``; the file is cut back to them (a chunk
    torn by a kill mid-write is recomputed, with the same seed, on resume). Raises if the rows
    belong to other inputs."""
    if not out.is_file() or out.stat().st_size == 0:
        return None
    lines = out.read_bytes().splitlines(keepends=True)
    if not lines[0].endswith(b"\n"):
        out.unlink()
        return None
    complete = [ln for ln in lines[1:] if ln.endswith(b"\n")]
    frame = pd.read_csv(io.BytesIO(lines[0] + b"".join(complete)), dtype={"id": str, "formula": str, "error": str}, keep_default_na=False, na_values=[""])
    if "id" not in frame or frame["id"].astype(str).tolist() != [str(i) for i in ids[: len(frame)]]:
        raise ValueError(f"{out} holds rows of other inputs; use a new out file")
    keep = (len(complete) // chunk) * chunk
    with open(out, "r+b") as fh:
        fh.truncate(len(lines[0]) + sum(len(ln) for ln in complete[:keep]))
    return frame.iloc[:keep].reset_index(drop=True)


def screen(
    inputs: Iterable,
    *,
    model: Predictor | str | None = None,
    ensemble: EnsemblePredictor | str | bool | None = None,
    samples: int = 16,
    level: float = 0.9,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int | None = 0,
    cluster: Any = None,
    retries: int = 2,
    max_atoms: int = DEFAULT_MAX_ATOMS,
) -> pd.DataFrame:
    """Predict many inputs in chunks. ``ensemble``: None/False none, True the shipped one, or a folder.

    With ``out`` (a .csv path), each chunk is appended as soon as it is done and a rerun resumes
    after the last complete chunk (inputs, ``batch_size`` and ``seed`` must be the same); chunk k's
    Monte-Carlo draws use seed ``seed + k``, so a resumed screen writes exactly the rows of an
    uninterrupted one.

    ``cluster``: a Dask ``distributed.Client``, a scheduler address (``'tcp://host:8786'``) or a
    cluster object: chunks run as tasks on its workers (``model``/``ensemble`` must then be folder
    paths or the shipped defaults, loaded once per worker), a failed chunk is rerun up to ``retries``
    times, and the rows are the same, in the same order, as without a cluster (see ``matbalora.cluster``).
    ``max_atoms``: larger structures are rejected (memory stays bounded by the row budget of
    ``BandGapModel.sample_gaps`` either way; the limit only bounds the time of one structure).
    """
    items = _items(inputs, max_atoms)
    chunk = batch_size or 256
    if chunk < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix.lower() != ".csv":
        raise ValueError(f"out={os.fspath(out)!r}: screening appends rows, use a .csv file")
    done = _completed_rows(out_path, chunk, [sid for sid, _ in items]) if out_path is not None else None
    n_done = 0 if done is None else len(done)
    # chunk k draws with seed + k: a resumed or distributed screen reproduces the same rows
    jobs = [(items[start : start + chunk], None if seed is None else seed + start // chunk) for start in range(n_done, len(items), chunk)]
    frames = [done] if n_done else []
    bar = tqdm(total=len(items), initial=n_done, desc="screening", unit="crystal", disable=not progress)
    options = {"samples": samples, "level": level, "max_atoms": max_atoms}
    for part in _chunk_rows(jobs, model, ensemble, options, cluster=cluster, retries=retries):
        if out_path is not None:
            header = not frames
            with open(out_path, "w" if header else "a", encoding="utf-8") as fh:
                fh.write(part.to_csv(index=False, header=header))
                fh.flush()
                os.fsync(fh.fileno())
        frames.append(part)
        bar.update(len(part))
    bar.close()
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _chunk_rows(jobs: list, model, ensemble, options: dict, *, cluster: Any, retries: int) -> Iterator[pd.DataFrame]:
    """The rows of each (items, seed) job, in job order: here, or as tasks on a Dask cluster."""
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
        calls = (((model_dir, ens_dir, part_items), {"seed": part_seed, **options}) for part_items, part_seed in jobs)
        yield from dask_cluster.ordered_results(client, dask_cluster.predict_chunk, calls, retries=retries)
    finally:
        if opened:
            client.close()
