"""Everything the web app shows, as pure functions: uploads -> checked structures and summaries,
one prediction call per structure, the page's predictions under a time bound, and the batch table.
The readings, figures and model cards are in ``matbalora.app`` (re-exported here).

The Streamlit UI (``app/streamlit_app.py``) only lays these out. Uploaded file names are labels,
never paths: the bytes are parsed from a private temporary folder under a name chosen here. What a
page may cost is bounded by ``Limits``: files per page, bytes per file (``.gz`` uploads also after
decompression), structures, atoms, and the seconds spent parsing each upload and predicting a page.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matbalora.app.cards import benchmark_images, model_cards  # noqa: F401 - re-exported for callers
from matbalora.app.figures import cell_figure, interval_figure, samples_figure  # noqa: F401 - re-exported
from matbalora.app.gaps import probabilities_text, reading  # noqa: F401 - re-exported
from matbalora.data.dataset import Rejection
from matbalora.data.formats import detect_format, file_id
from matbalora.defaults import LEVEL

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.core import Structure

    from matbalora.predict import EnsemblePredictor, Predictor

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
APP_SCRIPT = REPO / "app" / "streamlit_app.py"
ACCEPTED = "CIF (.cif), POSCAR/CONTCAR (.vasp, .poscar, or a name starting with POSCAR/CONTCAR), extended XYZ (.extxyz, .xyz), pymatgen JSON (.json); optionally gzipped (.gz)"


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; the app states these next to the uploader."""

    max_file_mb: int = 2  # per uploaded file, MiB
    max_atoms: int = 200  # per structure
    max_structures: int = 50  # per page (all uploads and examples together)
    max_files: int = 20  # uploaded files read per page
    max_decompressed_mb: int = 16  # per .gz upload, after decompression, MiB
    max_parse_seconds: int = 20  # reading one upload stops after this (each structure's work is bounded too)
    max_predict_seconds: int = 120  # predicting one page stops after this (cached results cost nothing)

    def __post_init__(self) -> None:
        for name in ("max_file_mb", "max_atoms", "max_structures", "max_files", "max_decompressed_mb",
                     "max_parse_seconds", "max_predict_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; must be a positive integer")

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024

    def describe(self) -> str:
        return (f"Up to {self.max_files} files of {self.max_file_mb} MB ({self.max_decompressed_mb} MB once "
                f"decompressed), {self.max_atoms} atoms per structure, {self.max_structures} structures at a time; "
                "ordered crystals only (no partial occupancies).")


@dataclass(frozen=True)
class Item:
    """One structure found in an upload, or the upload itself when nothing usable was found.

    ``source``: the uploaded file's name (a label); ``id``: unique on the page; ``key``: SHA-256 of
    the structure (a cache key); ``error``: plain-language reason when ``structure`` is None.
    """

    source: str
    id: str
    structure: Structure | None = None
    key: str = ""
    error: str = ""


def display_name(name: str) -> str:
    """A file name fit to show: no folders, no control characters, at most 80 characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return (base or "upload")[:80]


_PLAIN = {
    "unparsable": "could not be read",
    "disordered": "is disordered (partial occupancies); the model needs an ordered crystal",
    "too_many_atoms": "has too many atoms",
    "empty": "holds no atoms",
    "bad_lattice": "has no usable periodic cell",
    "non_finite": "has NaN or infinite numbers",
    "overlapping_atoms": "has overlapping atoms",
    "isolated_atom": "has an atom with no neighbour within the model's 6 Å cutoff",
    "duplicate_id": "repeats an earlier structure id",
}


def explain(rejection: Rejection) -> str:
    """One plain sentence for a reader's Rejection."""
    text = _PLAIN.get(rejection.reason, rejection.reason)
    return f"{text} ({rejection.detail})" if rejection.detail else text


def structure_key(structure: Structure) -> str:
    return hashlib.sha256(structure.to_json().encode()).hexdigest()


def _gunzip(data: bytes, limit: int) -> bytes | None:
    """The decompressed bytes of a gzip upload, or None when they exceed ``limit`` (read in
    blocks, so a gzip bomb never grows past the limit in memory)."""
    out = bytearray()
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
        while block := fh.read(1 << 20):
            out += block
            if len(out) > limit:
                return None
    return bytes(out)


def _until(deadline: float, entries, stopped: list[bool]):
    """``entries`` until ``time.monotonic()`` passes ``deadline`` (then ``stopped[0]`` is True)."""
    for entry in entries:
        yield entry
        if time.monotonic() > deadline:
            stopped[0] = True
            return


def read_upload(name: str, data: bytes, *, limits: Limits = Limits()) -> list[Item]:
    """The structures in one uploaded file, each checked; a bad file gives one Item with ``error``.
    A ``.gz`` upload is decompressed first, up to ``limits.max_decompressed_mb``; reading stops
    after ``limits.max_parse_seconds`` (an Item says so)."""
    from matbalora.data.entries import Checks, admit_structures
    from matbalora.data.formats import file_entries

    label = display_name(name)
    stem = file_id(label)
    if len(data) > limits.max_file_bytes:
        return [Item(label, label, error=f"file is {len(data) / 2**20:.1f} MB; the limit is {limits.max_file_mb} MB")]
    fmt = detect_format(label)
    if fmt is None:
        return [Item(label, label, error=f"unknown file type; accepted: {ACCEPTED}")]
    if label.lower().endswith(".gz"):
        try:
            data = _gunzip(data, limits.max_decompressed_mb * 2**20)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            return [Item(label, label, error=f"could not be read (not a valid gzip file: {exc})")]
        if data is None:
            return [Item(label, label, error=f"decompresses to more than {limits.max_decompressed_mb} MB; "
                                             f"the limit is {limits.max_decompressed_mb} MB")]
    suffix = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz", "json": ".json"}[fmt]
    stopped = [False]
    with tempfile.TemporaryDirectory(prefix="matbalora-upload-") as tmp:  # private (0700), random name
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:  # read_structures, but stopping after max_structures + 1 entries of a multi-frame file
            entries = file_entries(path, id_key="material_id", target_key="", limit=limits.max_structures + 1,
                                   max_atoms=limits.max_atoms)
            deadline = time.monotonic() + limits.max_parse_seconds
            found = admit_structures(_until(deadline, entries, stopped), checks=Checks(max_atoms=limits.max_atoms))
        except (ValueError, OSError) as exc:
            found = [("upload", Rejection("upload", "unparsable", str(exc)))]
    items = []
    if len(found) > limits.max_structures:
        found = found[:limits.max_structures]
        items.append(Item(label, label, error=f"holds more than {limits.max_structures} structures; only the first {limits.max_structures} are used"))
    if stopped[0]:
        items.append(Item(label, label, error=f"reading stopped after {limits.max_parse_seconds} s; "
                                               f"only the first {len(found)} structures are used"))
    for sid, obj in found:
        sid = sid.replace(os.fspath(path), stem)
        sid = stem + sid[len("upload"):] if sid.startswith("upload") else sid
        if isinstance(obj, Rejection):
            detail = obj.detail.replace(os.fspath(path), label).replace(tmp, "")
            items.append(Item(label, sid, error=explain(Rejection(sid, obj.reason, detail))))
        else:
            items.append(Item(label, sid, obj, structure_key(obj)))
    return items or [Item(label, label, error="no structure found in the file")]


def read_uploads(files: Sequence[tuple[str, bytes]], *, limits: Limits = Limits(), read=None) -> list[Item]:
    """``read_upload`` of each ``(name, bytes)`` (``read``: a cached wrapper of it, default the
    function itself); files beyond ``limits.max_files`` are not read, each says so."""
    read = read or (lambda name, data: read_upload(name, data, limits=limits))
    items: list[Item] = []
    for n, (name, data) in enumerate(files):
        if n < limits.max_files:
            items.extend(read(name, data))
        else:
            label = display_name(name)
            items.append(Item(label, label, error=f"skipped: more than {limits.max_files} files at a time"))
    return items


def out_of_time(started: float, *, limits: Limits = Limits()) -> str:
    """The reason a page's predictions stop (``started``: ``time.monotonic()`` at the first), or ""."""
    if time.monotonic() - started > limits.max_predict_seconds:
        return f"skipped: this page's prediction time ({limits.max_predict_seconds} s) is used up; upload fewer structures"
    return ""


def collect(items: Sequence[Item], *, limits: Limits = Limits()) -> list[Item]:
    """Ids made unique (``Si``, ``Si (2)``); structures beyond ``max_structures`` become errors."""
    seen: dict[str, int] = {}
    out, n_good = [], 0
    for item in items:
        n = seen[item.id] = seen.get(item.id, 0) + 1
        sid = item.id if n == 1 else f"{item.id} ({n})"
        if item.structure is not None:
            n_good += 1
            if n_good > limits.max_structures:
                item = Item(item.source, sid, error=f"skipped: more than {limits.max_structures} structures at a time")
        out.append(Item(item.source, sid, item.structure, item.key, item.error))
    return out


def _fcc(a: float):
    from pymatgen.core import Lattice

    return Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])  # primitive cell, Å


def _example(name: str) -> Structure:
    from pymatgen.core import Lattice, Structure

    if name == "β-Ga2O3 (monoclinic, 20 atoms)":  # conventional C2/m cell, all five sites 4i
        return Structure.from_spacegroup(
            "C2/m", Lattice.monoclinic(12.214, 3.0371, 5.7981, 103.83), ["Ga", "Ga", "O", "O", "O"],
            [[0.0904, 0, 0.7948], [0.3414, 0, 0.6857], [0.1674, 0, 0.1011], [0.4957, 0, 0.2553], [0.8279, 0, 0.4365]])
    cubic = {"SrTiO3 (cubic perovskite)": (Lattice.cubic(3.945), ["Sr", "Ti", "O", "O", "O"],
                                           [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])}
    fcc = {"Si (diamond)": (5.468, ["Si", "Si"], [[0, 0, 0], [0.25] * 3]),
           "GaAs (zinc blende)": (5.75, ["Ga", "As"], [[0, 0, 0], [0.25] * 3]),
           "NaCl (rock salt)": (5.69, ["Na", "Cl"], [[0, 0, 0], [0.5] * 3]),
           "Cu (fcc metal)": (3.63, ["Cu"], [[0, 0, 0]])}
    if name in fcc:
        a, species, coords = fcc[name]
        return Structure(_fcc(a), species, coords)
    return Structure(*cubic[name])


EXAMPLES: tuple[str, ...] = ("Si (diamond)", "GaAs (zinc blende)", "NaCl (rock salt)", "Cu (fcc metal)",
                             "SrTiO3 (cubic perovskite)", "β-Ga2O3 (monoclinic, 20 atoms)")


def example(name: str) -> Item:
    """A built-in example crystal (names in ``EXAMPLES``; experimental lattice constants)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {list(EXAMPLES)}")
    structure = _example(name)
    return Item("built-in example", name.split(" ")[0], structure, structure_key(structure))


def summarize(structure: Structure) -> dict[str, Any]:
    """Formula, space group, lattice (Å, degrees), volume (Å^3), atom count, density (g/cm^3)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        space_group = f"{sga.get_space_group_symbol()} ({sga.get_space_group_number()})"
        system = sga.get_crystal_system()
    except Exception:  # noqa: BLE001 - spglib fails on odd cells; the summary is useful without it
        space_group, system = "undetermined", "undetermined"
    lat = structure.lattice
    return {
        "formula": structure.composition.reduced_formula,
        "cell formula": structure.composition.formula.replace(" ", ""),
        "space group": space_group,
        "crystal system": system,
        "atoms": len(structure),
        "a, b, c (Å)": ", ".join(f"{x:.3f}" for x in lat.abc),
        "α, β, γ (°)": ", ".join(f"{x:.2f}" for x in lat.angles),
        "volume (Å³)": round(lat.volume, 2),
        "density (g/cm³)": round(float(structure.density), 3),
    }


@dataclass(frozen=True)
class Prediction:
    """BaLoRA and deep-ensemble predictions for one structure.

    ``balora``/``ensemble``: the columns of ``predict`` as returned: band_gap, std, lower, upper (eV),
    p_metal and, when ``window`` (lo, hi) eV was asked for, p_window; ``draws``: [S] the Monte-Carlo
    band gaps behind ``balora`` (eV); ``error``: why there is no prediction; ``seconds``: wall time.
    """

    balora: dict[str, float]
    ensemble: dict[str, float]
    draws: np.ndarray = field(default_factory=lambda: np.empty(0))
    level: float = LEVEL
    error: str = ""
    seconds: float = 0.0
    window: tuple[float, float] | None = None


@dataclass
class Models:
    """The BaLoRA model and the deep ensemble, shared by every session of a server.

    A model keeps its sampling mode and generator on itself while it runs, so calls take ``lock``:
    two sessions predicting at once are served one after the other, never interleaved.
    """

    model: Predictor
    ensemble: EnsemblePredictor
    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, structure: Structure, *, samples: int, level: float, window: tuple[float, float] | None = None,
                seed: int = 0) -> Prediction:
        with self.lock:
            return predict_structure(self.model, self.ensemble, structure, samples=samples, level=level,
                                     window=window, seed=seed)


def load_models(models: str | os.PathLike | None = None) -> Models:
    """The BaLoRA model (``balora/``) and the deep ensemble (``lora_ensemble/``) of a models folder
    (default: the shipped one, or ``$MATBALORA_MODELS``)."""
    from matbalora.api import load_ensemble, load_model, models_dir

    folder = Path(models) if models is not None else models_dir()
    return Models(load_model(folder / "balora"), load_ensemble(folder / "lora_ensemble"), folder)


#: The columns of ``predict`` a Prediction keeps for each model (and ``p_window`` with a window).
PREDICTION_KEYS: tuple[str, ...] = ("band_gap", "std", "lower", "upper", "p_metal")
#: The gap window (eV) the pages start with.
WINDOW: tuple[float, float] = (1.0, 2.0)


def predict_structure(model: Predictor, ensemble: EnsemblePredictor, structure: Structure, *,
                      samples: int, level: float, window: tuple[float, float] | None = None, seed: int = 0) -> Prediction:
    """Both predictions for one structure (``window``: (lo, hi) eV for ``p_window``), and the
    Monte-Carlo draws behind the BaLoRA row."""
    from matbalora.predict import Predictor, prepare
    from matbalora.probabilities import check_window

    class KeepDraws(Predictor):  # the same model; remembers the draws predict_prepared summarises
        def sample(self, prep, *, samples, seed=0):
            self.draws = super().sample(prep, samples=samples, seed=seed)
            return self.draws

    window = None if window is None else check_window(window)
    start = time.perf_counter()
    prep = prepare(model.model, [structure], ["upload"])
    keeper = KeepDraws(model.model, model.config)
    ours = keeper.predict_prepared(prep, samples=samples, level=level, seed=seed, window=window).iloc[0]
    if ours["error"]:
        return Prediction({}, {}, level=level, error=ours["error"], seconds=time.perf_counter() - start, window=window)
    theirs = ensemble.predict_prepared(prep, level=level, window=window).iloc[0]
    keys = PREDICTION_KEYS + (("p_window",) if window is not None else ())
    return Prediction({k: float(ours[k]) for k in keys}, {k: float(theirs[k]) for k in keys},
                      keeper.draws.gaps[:, 0], level, "", time.perf_counter() - start, window)


def predict_items(items: Sequence[Item], predict: Callable[[Item], Prediction], *, level: float,
                  limits: Limits = Limits(), progress: Callable[[int, int], None] | None = None) -> dict[str, Prediction]:
    """One Prediction per readable item, keyed by id, in order. ``predict(item)`` makes one; one that
    raises becomes that item's error (logged), and once the page has spent ``limits.max_predict_seconds``
    the rest are skipped with the reason. ``progress(done, total)`` is called after each."""
    good = [item for item in items if item.structure is not None]
    preds: dict[str, Prediction] = {}
    started = time.monotonic()
    for n, item in enumerate(good):
        if spent := out_of_time(started, limits=limits):
            preds[item.id] = Prediction({}, {}, level=level, error=spent)
        else:
            try:
                preds[item.id] = predict(item)
            except Exception as exc:  # noqa: BLE001 - one failing structure must not take the page down
                log.exception("prediction failed for %s", item.id)
                preds[item.id] = Prediction({}, {}, level=level, error=f"prediction failed: {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(n + 1, len(good))
    return preds


def batch_table(rows: Sequence[tuple[Item, Prediction | None]], *, window: tuple[float, float] | None = None) -> pd.DataFrame:
    """One row per item for the sortable table and its CSV: gaps, bounds and std in eV, ``p_metal``
    and, with ``window`` (the one the predictions were made with), ``p_window`` of both models, the
    reading, the level and the window's edges (eV)."""
    import pandas as pd

    keys = ("band_gap", "lower", "upper", "std", "p_metal") + (("p_window",) if window is not None else ())
    records = []
    for item, pred in rows:
        ok = item.structure is not None and pred is not None and not pred.error
        if ok and pred.window != window:
            raise ValueError(f"the prediction of {item.id!r} has window={pred.window!r}, the table window={window!r}")
        rec: dict[str, Any] = {"file": item.source, "structure": item.id,
                               "formula": item.structure.composition.reduced_formula if item.structure else "",
                               "atoms": len(item.structure) if item.structure else None}
        for prefix, part in (("balora", "balora"), ("ensemble", "ensemble")):
            values = getattr(pred, part) if ok else {}
            for key in keys:
                rec[f"{prefix}_{key}"] = values.get(key, math.nan)
        rec["reading"] = reading(pred.balora, level=pred.level, window=window) if ok else ""
        rec["level"] = pred.level if ok else math.nan
        if window is not None:
            rec["window_lo"], rec["window_hi"] = window
        rec["message"] = item.error or (pred.error if pred is not None else "")
        records.append(rec)
    return pd.DataFrame.from_records(records)


def server_flags(*, port: int | None = None, address: str | None = None, limits: Limits = Limits()) -> list[str]:
    """``streamlit run`` options: headless, no usage statistics, no file watcher, the upload cap."""
    flags = ["--server.headless=true", "--browser.gatherUsageStats=false", "--server.fileWatcherType=none",
             f"--server.maxUploadSize={limits.max_file_mb}", "--client.toolbarMode=viewer"]
    flags += [f"--server.port={port}"] if port is not None else []
    flags += [f"--server.address={address}"] if address is not None else []
    return flags


def launch(argv: Sequence[str] | None = None) -> int:
    """``matbalora app [--models DIR] [--port N] [--address HOST] [streamlit options]``: serve the app."""
    parser = argparse.ArgumentParser(prog="matbalora app", description="Serve the band-gap web app.")
    parser.add_argument("--models", help="folder holding balora/ and lora_ensemble/ (default: the shipped models)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8501)")
    parser.add_argument("--address", help="address to bind (default: all interfaces)")
    args, rest = parser.parse_known_args(list(argv or []))
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("matbalora app: streamlit is not installed; pip install 'matbalora[app]'", file=sys.stderr)
        return 2
    if not APP_SCRIPT.is_file():
        print(f"matbalora app: {APP_SCRIPT} is missing; the app runs from a source checkout", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.models:
        env["MATBALORA_MODELS"] = os.fspath(Path(args.models).resolve())
    from matbalora.api import models_dir

    folder = Path(env["MATBALORA_MODELS"]) if "MATBALORA_MODELS" in env else models_dir()
    missing = [name for name in ("balora", "lora_ensemble") if not (folder / name).is_dir()]
    if missing:
        print(f"matbalora app: no {' or '.join(missing)} model folder in {folder}; "
              "train the models or pass --models DIR", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "streamlit", "run", os.fspath(APP_SCRIPT),
           *server_flags(port=args.port, address=args.address), *rest]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:  # Ctrl-C stops the server (subprocess.call has already ended it)
        return 130
