"""``matbalora app``: serve the Streamlit app shipped inside the package (``streamlit_app.py`` and
``pages/`` next to this module), so it runs from an installed package as from a source checkout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from matbalora.app.uploads import Limits

#: The Streamlit entry file; its pages are in ``pages/`` beside it.
APP_SCRIPT = Path(__file__).resolve().parent / "streamlit_app.py"


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
        print(f"matbalora app: {APP_SCRIPT} is missing; reinstall matbalora", file=sys.stderr)
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
