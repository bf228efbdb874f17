"""Crash safety with real processes: SIGKILL a training run mid-epoch and a screen between chunks,
restart them, and get exactly what an uninterrupted run gives (tests/kill_worker.py is the process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from ase.io import write
from safetensors.torch import load_file

from conftest import toy_set

WORKER = Path(__file__).resolve().parent / "kill_worker.py"
TIMEOUT = 120  # s, per wait; a healthy run needs a few seconds
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-3000:]


def wait_until(condition, proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until true; fail if the process exits first or after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def _int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_checkpoint, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = start("train", str(ref), str(tiny_checkpoint))  # in parallel with the run to be killed
    victim = start("train", str(run), str(tiny_checkpoint), "--step-delay", "0.15")
    # epoch 1 has 8 steps; its checkpoint exists, then wait for step 10 = step 2 of epoch 2
    wait_until(lambda: (run / "train_state.json").is_file() and _int(run / "heartbeat") >= 10, victim, "epoch 2")
    sigkill(victim)
    state = json.loads((run / "train_state.json").read_text())
    assert state["epoch"] == 1 and _int(run / "heartbeat") < 16, "the kill did not land inside epoch 2"
    assert load_file(str(run / "train_state.safetensors"))  # the checkpoint on disk is whole
    finish(start("train", str(run), str(tiny_checkpoint), "--resume"))
    finish(reference)
    assert _int(run / "heartbeat") == _int(ref / "heartbeat") - 8  # the resumed process skipped epoch 1

    a, b = json.loads((ref / "final.json").read_text()), json.loads((run / "final.json").read_text())
    assert len(a["history"]) == len(b["history"]) == 3
    for key in ("train_loss", "kl", "val_mae"):
        assert [e[key] for e in b["history"]] == pytest.approx([e[key] for e in a["history"]], abs=1e-6), key
    assert b["best_val_mae"] == pytest.approx(a["best_val_mae"], abs=1e-6)
    wa, wb = load_file(str(ref / "final.safetensors")), load_file(str(run / "final.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name


def _rows(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_screen_killed_between_chunks_resumes_without_loss_or_duplicates(tiny_model_dirs, tmp_path):
    from ase import Atoms

    structs, _ = toy_set(36, seed=3)
    frames = []
    for i, s in enumerate(structs):
        atoms = Atoms([site.specie.symbol for site in s], positions=s.cart_coords, cell=s.lattice.matrix, pbc=True)
        atoms.info["material_id"] = f"toy-{i:02d}"
        frames.append(atoms)
    inputs = tmp_path / "inputs.extxyz"
    write(inputs, frames, format="extxyz")
    model = tiny_model_dirs / "balora"
    full, partial = tmp_path / "full.csv", tmp_path / "partial.csv"

    reference = start("screen", str(full), str(model), str(inputs))
    victim = start("screen", str(partial), str(model), str(inputs), "--chunk-delay", "0.3")
    wait_until(
        lambda: partial.is_file() and len(_rows(partial)) >= 1 + 3 * 3, victim, "three chunks"
    )  # header + 3 chunks of 3
    sigkill(victim)
    written = len(_rows(partial)) - 1
    assert 9 <= written < 36, f"{written} rows at the kill"
    finish(start("screen", str(partial), str(model), str(inputs)))
    finish(reference)
    assert (
        _int(partial.with_suffix(".passes")) <= _int(full.with_suffix(".passes")) - 3
    )  # it resumed, did not start over

    assert _rows(partial) == _rows(full)  # the same rows, byte for byte: none lost, none duplicated
    frame = pd.read_csv(partial)
    assert frame["id"].tolist() == [f"toy-{i:02d}" for i in range(36)]
    assert frame["band_gap"].notna().all() and (frame["error"].isna() | (frame["error"] == "")).all()


def test_two_screens_on_one_output_never_duplicate_or_lose_a_row(tiny_model_dirs, tmp_path):
    """Two screen processes started together on one output: one writes it, the other is refused
    with a clear message (the output lock); a rerun through the CLI finds the screen finished."""
    from ase import Atoms

    structs, _ = toy_set(12, seed=4)
    frames = []
    for i, s in enumerate(structs):
        atoms = Atoms([site.specie.symbol for site in s], positions=s.cart_coords, cell=s.lattice.matrix, pbc=True)
        atoms.info["material_id"] = f"toy-{i:02d}"
        frames.append(atoms)
    inputs, out, model = tmp_path / "inputs.extxyz", tmp_path / "out.csv", tiny_model_dirs / "balora"
    write(inputs, frames, format="extxyz")
    both = [start("screen", str(out), str(model), str(inputs), "--chunk-delay", "0.5") for _ in range(2)]
    results = [(proc.communicate(timeout=TIMEOUT)[0], proc.returncode) for proc in both]
    codes = sorted(code for _, code in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(text for text, code in results if code != 0)
    assert "is being written by another screen" in refused and "use another out file" in refused
    ids = pd.read_csv(out, dtype={"id": str})["id"].tolist()
    assert ids == [f"toy-{i:02d}" for i in range(12)]  # each row once, in order
    before = out.read_bytes()
    cli = [sys.executable, "-m", "matbalora.cli", "screen", str(inputs), "--model", str(model), "--samples", "2",
           "--batch-size", "3", "--out", str(out), "--no-progress"]
    rerun = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "12 rows, 0 rejected" in rerun.stdout and out.read_bytes() == before  # same settings: nothing to do
