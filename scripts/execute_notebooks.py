"""Execute the notebooks on the shipped models and save them with their outputs (plots, tables).

    .venv/bin/python scripts/execute_notebooks.py                 # both notebooks, in place
    .venv/bin/python scripts/execute_notebooks.py screening.ipynb

Each notebook runs in a fresh kernel with cwd ``notebooks/`` (as a reader runs it), on ``models/``
and the notebook's own defaults (e.g. 300 test crystals); the file is replaced atomically only when
every cell ran. CI does not run this: tests/test_notebooks.py executes the same notebooks on tiny
models without writing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 1800


def execute(path: Path) -> float:
    import nbclient
    import nbformat

    from matbalora.atomic import write_text

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    write_text(path, nbformat.writes(nb))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["compare_uncertainty.ipynb", "screening.ipynb"])
    args = parser.parse_args(argv)
    os.environ.setdefault("MATBALORA_MODELS", str(REPO / "models"))
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in args.names:
        seconds = execute(NOTEBOOKS / name)
        print(f"{name}: executed in {seconds:.0f} s, outputs saved", flush=True)


if __name__ == "__main__":
    sys.exit(main())
