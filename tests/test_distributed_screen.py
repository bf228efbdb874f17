"""Screening on a 2-worker Dask LocalCluster started here: same rows as one process, in order, and
complete after a failed task or a killed worker."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import matbalora
from conftest import REPO
from matbalora.cli import main

distributed = pytest.importorskip("distributed")

EXAMPLES = REPO / "data" / "examples"


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    ) as cluster, distributed.Client(cluster) as dask_client:
        yield dask_client


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    """The example CIFs plus one that fails validation (its row must survive, with the reason)."""
    folder = tmp_path / "inputs"
    shutil.copytree(EXAMPLES, folder)
    (folder / "overlap.vasp").write_text("clash\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\nDirect\n0 0 0\n0.01 0 0\n")
    return sorted(folder.iterdir())


def _local(inputs, tiny_model_dirs, out, **kw) -> pd.DataFrame:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Dask worker (OMP_NUM_THREADS=1): same float rounding
    try:
        return matbalora.screen(inputs, model=tiny_model_dirs / "balora", out=out, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_cluster_screen_matches_single_process(client, inputs, tiny_model_dirs, tmp_path):
    kw = dict(ensemble=tiny_model_dirs / "lora_ensemble", samples=4, batch_size=2, seed=3)
    local = _local(inputs, tiny_model_dirs, tmp_path / "local.csv", **kw)
    remote = matbalora.screen(
        inputs, model=tiny_model_dirs / "balora", out=tmp_path / "remote.csv", progress=False, cluster=client, **kw
    )
    assert (tmp_path / "remote.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    pd.testing.assert_frame_equal(remote, local)
    assert len(local) == len(inputs) and local["error"].str.startswith("overlapping_atoms").sum() == 1
    assert local["std"].notna().sum() == len(inputs) - 1
    loaded = client.run(lambda: sorted(kind for kind, _ in __import__("matbalora.cluster").cluster._CACHE))
    assert all(kinds in ([], ["ensemble", "model"]) for kinds in loaded.values())  # once per worker


def test_cli_screen_with_scheduler_address(client, inputs, tiny_model_dirs, tmp_path, capsys):
    _local(inputs, tiny_model_dirs, tmp_path / "local.csv", samples=2, batch_size=3)
    out = tmp_path / "cli.csv"
    args = ["screen", *map(str, inputs), "--model", str(tiny_model_dirs / "balora"), "--samples", "2",
            "--batch-size", "3", "--out", str(out), "--scheduler", client.scheduler.address, "--no-progress"]
    assert main(args) == 0
    assert "rows" in capsys.readouterr().out
    assert out.read_bytes() == (tmp_path / "local.csv").read_bytes()


def test_failed_task_is_retried_in_order_without_duplicates(client, tmp_path):
    from matbalora.cluster import ordered_results

    def flaky(k: int, marker_dir: str) -> int:  # fails on its first attempt at job 2
        marker = os.path.join(marker_dir, f"failed-{k}")
        if k == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("flaky worker")
        return 10 * k

    jobs = [((k, str(tmp_path)), {}) for k in range(7)]
    assert list(ordered_results(client, flaky, jobs, window=3, retries=1)) == [10 * k for k in range(7)]
    assert (tmp_path / "failed-2").exists()
    for marker in tmp_path.glob("failed-*"):
        marker.unlink()
    with pytest.raises(RuntimeError, match="flaky worker"):
        list(ordered_results(client, flaky, jobs, window=3, retries=0))


def test_killed_worker_loses_and_duplicates_nothing(client, inputs, tiny_model_dirs, tmp_path):
    marker = str(tmp_path / "killed")

    def kill_once_plugin():
        class KillOnce(distributed.WorkerPlugin):  # the first worker to start a chunk dies mid-task
            def transition(self, key, start, finish, **kwargs):
                if finish == "executing" and "predict_chunk" in str(key):
                    try:
                        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        return
                    os._exit(1)

        return KillOnce()

    client.register_plugin(kill_once_plugin(), name="kill-once")
    try:
        remote = matbalora.screen(
            inputs, model=tiny_model_dirs / "balora", samples=2, batch_size=2, out=tmp_path / "remote.csv",
            progress=False, cluster=client,
        )
    finally:
        client.unregister_worker_plugin("kill-once")
    assert os.path.exists(marker)  # a worker really died
    local = _local(inputs, tiny_model_dirs, tmp_path / "local.csv", samples=2, batch_size=2)
    assert remote["id"].tolist() == local["id"].tolist() and remote["id"].is_unique
    assert (tmp_path / "remote.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
