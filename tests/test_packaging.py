"""The wheel carries what an installed package needs: the Streamlit pages and the shipped models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.skipif(not (REPO / "models" / "balora").is_dir(), reason="no shipped models in this checkout")
def test_wheel_ships_the_app_pages_and_the_models(tmp_path):
    pytest.importorskip("setuptools", minversion="68")  # pyproject.toml's build requirement
    had_build = (REPO / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                        str(REPO)], check=True, capture_output=True, timeout=300)
    finally:
        if not had_build:  # setuptools builds in the checkout; leave it as it was
            shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("matbalora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    pages = {f"matbalora/app/{p}" for p in ("streamlit_app.py", "pages/predict.py", "pages/screen.py", "pages/model_card.py")}
    assert pages <= names
    shipped = {n.removeprefix("matbalora/shipped_models/") for n in names if n.startswith("matbalora/shipped_models/")}
    in_repo = {p.relative_to(REPO / "models").as_posix() for p in (REPO / "models").rglob("*") if p.is_file()}
    assert shipped == in_repo and "balora/model.safetensors" in shipped
