"""Execute the notebooks end to end on a small subset, so they cannot rot.

Each notebook runs in a fresh ``python3`` kernel (this interpreter, via ipykernel) with cwd
``notebooks/`` as a reader would run it. The executed copy is written to ``tmp_path`` only (open it
there when a cell fails); the repository's notebook files are never written. The kernel gets
``MATBALORA_NB_N`` / ``MATBALORA_NB_SAMPLES`` small, one thread, and ``MATBALORA_MODELS`` pointing at
the tiny model folders of ``conftest.tiny_model_dirs`` (set ``MATBALORA_NB_SHIPPED=1`` to run on the
shipped ``models/`` instead; slower).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from conftest import REPO  # noqa: E402

NOTEBOOKS = REPO / "notebooks"
SHIPPED = REPO / "models"
CELL_TIMEOUT_S = 120


@pytest.fixture
def notebook_env(tiny_model_dirs, monkeypatch) -> dict[str, str]:
    """Environment of the kernel (a child of this process): small sizes, one thread, model folders."""
    env = {
        "MATBALORA_NB_N": "12",
        "MATBALORA_NB_SAMPLES": "4",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "TQDM_DISABLE": "1",
    }
    if os.environ.get("MATBALORA_NB_SHIPPED") == "1":
        if not ((SHIPPED / "balora").is_dir() and (SHIPPED / "lora_ensemble").is_dir()):
            pytest.skip("MATBALORA_NB_SHIPPED=1 but models/balora or models/lora_ensemble is missing")
        env["MATBALORA_MODELS"] = str(SHIPPED)
    else:
        env["MATBALORA_MODELS"] = str(tiny_model_dirs)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def execute(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` in a fresh kernel; the executed copy goes to ``tmp_path/<name>``."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)  # partial outputs help when a cell fails
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def n_images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_compare_uncertainty_notebook(notebook_env, tmp_path):
    nb = execute("compare_uncertainty.ipynb", tmp_path)
    text = outputs_text(nb)
    assert "mp_gap.extxyz.gz" in text  # says which data file it read: ../shared/data in place (the sample is no longer tracked)
    assert "12 fold-0 test crystals" in text
    assert "most certain #1" in text and "least certain #1" in text
    assert "On these 12 test crystals" in text
    assert "benchmarks/results/mp_gap.json" in text  # the benchmark cell either shows the table or says why not
    # calibration (2 subsets x 2 methods), sparsification, parity, error vs std, intervals, compute sweep
    assert n_images(nb) >= 6


def test_screening_notebook(notebook_env, tmp_path):
    nb = execute("screening.ipynb", tmp_path)
    text = outputs_text(nb)
    assert "12 structures from the data file" in text
    assert "broken_overlapping_atoms" in text and "overlapping_atoms" in text
    assert "same rows as before: True" in text
    assert "top 20 by p_window, read back from the finished screen" in text  # the shortlist ranks by p_window
    assert "candidates have P(1.5 eV <= gap <= 3.0 eV) >= 0.5" in text and "sum of p_window" in text
    assert "shortlist.csv" in text
    assert n_images(nb) == 1
