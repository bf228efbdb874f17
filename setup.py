"""Build hook (the metadata is in pyproject.toml): ship the trained models of ``models/`` (15 MB)
inside the wheel as ``matbalora/shipped_models/``, so ``matbalora predict`` and ``matbalora app``
find them in an installed package. An editable install reads ``models/`` in place instead
(``matbalora.api.models_dir``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"


class BuildPyWithModels(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode or not MODELS.is_dir():
            return
        target = Path(self.build_lib) / "matbalora" / "shipped_models"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(MODELS, target, ignore=shutil.ignore_patterns("*.pt", "*.ckpt", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithModels})
