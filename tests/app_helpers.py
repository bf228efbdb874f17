"""Helpers for the app tests and ``scripts/app_screenshot.py``: tiny model folders laid out like
the shipped ``models/`` (``balora/`` + ``lora_ensemble/``), a Streamlit server on a free port, and
the offline headless-Chromium flags."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from conftest import tiny_model


def make_models(root: Path, checkpoint: Path | None, *, members: int = 2) -> Path:
    """A BaLoRA model with random B (so its draws differ) and an ensemble of ``members`` LoRA models,
    on the backbone ``checkpoint`` (None: the pretrained CHGNet; untrained, for timing only)."""
    from matbalora.adapters import adapters_of
    from matbalora.checkpoint import save_model

    root = Path(root)
    model = tiny_model("balora", checkpoint, log_a_init=-1.0)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in adapters_of(model.backbone):
            m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=gen))
    card = {"calibration": {"std_scale": 1.0}, "metrics": {"test": {"mae": 0.5, "note": "tiny test model"}}}
    save_model(model, root / "balora", extra=card)
    names = [f"member_{k}" for k in range(members)]
    for k, name in enumerate(names):
        save_model(tiny_model("lora", checkpoint, seed=k + 1), root / "lora_ensemble" / name)
    (root / "lora_ensemble" / "ensemble.json").write_text(
        json.dumps({"members": names, "calibration": {"std_scale": 1.0}}), encoding="utf-8")
    return root


CHROMIUM = Path("/usr/bin/chromium")
#: Headless Chromium that never reaches the network; SwiftShader gives WebGL for the 3D cell view.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(models: Path, log: Path, *, timeout: float = 90.0) -> Iterator[str]:
    """Serve the app on a free localhost port with ``models``; yields its URL, stops it afterwards."""
    from matbalora import app as sup

    port = free_port()
    env = {**os.environ, "MATBALORA_MODELS": os.fspath(models), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "streamlit", "run", os.fspath(sup.APP_SCRIPT), *sup.server_flags(port=port, address="127.0.0.1")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
