"""Screening on a Dask distributed cluster: chunk tasks, one model per worker, rows in input order.

Why Dask distributed rather than Ray: screening is embarrassingly parallel over chunks of crystals,
so all it needs from an engine is futures with per-task retries, recovery from lost workers, and a
way to run on the machines people have. Dask is pure Python and pip-installs next to torch with no
compiled runtime of its own; ``dask scheduler`` / ``dask worker`` start an ad hoc cluster on any
hosts, dask-jobqueue submits workers through SLURM/PBS/LSF and dask-kubernetes through Kubernetes;
its futures take ``retries=``, its nanny restarts a killed worker and the scheduler reruns the
worker's tasks; its worker processes start with ``OMP_NUM_THREADS=1`` (no thread oversubscription
of torch); a ``LocalCluster`` starts in-process for tests. Ray offers the same core (tasks, actors,
retries) but brings a large compiled runtime (object store, GCS head node) that has to match
across nodes, and its HPC batch-scheduler story is scripts rather than a maintained package; its
actors would hold the model, which Dask gets from a per-process cache (:func:`cached_predictor`).

How a screen runs (``matbalora.screen(..., cluster=...)``): the client reads and validates the
inputs, cuts them into chunks of ``batch_size`` crystals and submits each as one task, exactly as
the single-process screen does; a crystal's draws depend only on the crystal and the seed, so the
rows are the same. At most ``window`` chunks are
in flight; the client collects them in input order and appends each to the output as it arrives.
A chunk whose task raises is rerun (``retries``), a chunk on a lost worker is rerun by the scheduler;
either way the client writes each chunk once, so nothing is lost or duplicated, and a killed client
resumes from the output file like a local screen. Workers load the model folder given as a path
(it must be readable at that path on every worker: a shared file system or the same install).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

#: Attempts after the first for a chunk whose task raised (lost workers are retried by the scheduler).
DEFAULT_RETRIES = 2

_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()
def cached_predictor(kind: str, folder: str) -> Any:
    """The Predictor (``kind='model'``) or EnsemblePredictor (``'ensemble'``) of ``folder``, loaded once
    per worker process and kept for every later chunk."""
    key = (kind, folder)
    with _CACHE_LOCK:
        if key not in _CACHE:
            from matbalora.allocator import tune_cpu_allocator
            from matbalora.predict import EnsemblePredictor, Predictor

            tune_cpu_allocator()
            _CACHE[key] = (Predictor if kind == "model" else EnsemblePredictor).load(folder)
        return _CACHE[key]


def predict_chunk(rows: Callable, model: str, ensemble: str | None, items: Sequence[tuple[str, Any]], **options: Any):
    """Worker task: ``rows(items, predictor, ensemble_predictor, **options)``, the rows of one chunk as
    the caller computes them in a single-process screen (``screening.predict_items``, passed by
    reference so this module does not import the screening layer above it)."""
    predictor = cached_predictor("model", model)
    ens = cached_predictor("ensemble", ensemble) if ensemble is not None else None
    return rows(items, predictor, ens, **options)  # a model's sampling state is per thread: no lock


def connect(cluster: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` for ``cluster`` (a Client, a scheduler address, or a cluster object),
    and whether we opened it (and must close it)."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cluster screening needs Dask distributed: pip install 'matbalora[cluster]'") from exc
    if isinstance(cluster, Client):
        return cluster, False
    if isinstance(cluster, str) and not cluster.strip():
        raise ValueError("cluster='' is not a scheduler address; use e.g. 'tcp://host:8786'")
    return Client(cluster), True


def ordered_results(
    client: Any,
    fn: Callable,
    jobs: Iterable[tuple[tuple, dict]],
    *,
    window: int | None = None,
    retries: int = DEFAULT_RETRIES,
) -> Iterator[Any]:
    """``fn(*args, **kwargs)`` for each job on the cluster, yielded in job order.

    At most ``window`` jobs are in flight (default: twice the cluster's threads), so inputs are
    shipped as the screen advances rather than all at once. A job that still fails after
    ``retries`` reruns raises here; the jobs after it are cancelled.
    """
    if window is None:
        window = max(2, 2 * sum(client.nthreads().values()))
    if window < 1 or retries < 0:
        raise ValueError(f"window={window}, retries={retries}: need window >= 1 and retries >= 0")
    jobs = iter(jobs)
    pending: deque = deque()

    def submit_next() -> None:
        job = next(jobs, None)
        if job is not None:
            args, kwargs = job
            pending.append(client.submit(fn, *args, retries=retries, pure=False, **kwargs))

    for _ in range(window):
        submit_next()
    try:
        while pending:
            future = pending.popleft()
            result = future.result()
            future.release()
            submit_next()
            yield result
    finally:
        for future in pending:
            future.cancel()


def folder_path(value: Any, *, default: str, name: str) -> str:
    """Absolute model folder a worker can load: a path, or the shipped default for None/True."""
    from matbalora.api import _resolve

    if value is None or value is True:
        return os.fspath(_resolve(None, default).resolve())
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(Path(_resolve(value, default)).resolve())
    raise TypeError(
        f"{name}={type(value).__name__}: on a cluster every worker loads the model itself; pass the model folder as a path"
    )
