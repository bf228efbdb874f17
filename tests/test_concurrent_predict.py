"""Two threads predicting with one model at once get the numbers one thread gets, without a lock
(the BaLoRA sampling state is per thread, issue 17 item 2)."""

from __future__ import annotations

import threading

import numpy as np

import matbalora
from conftest import copper, perovskite, rocksalt_nacl, silicon

NUMBERS = ["band_gap", "std", "lower", "upper", "p_metal"]


def test_two_threads_share_one_model_and_get_the_single_thread_numbers(shipped_like):
    model = matbalora.load_model()
    batches = [[silicon(), rocksalt_nacl(), perovskite()] * 3, [copper(), perovskite(), silicon(), rocksalt_nacl().get_primitive_structure()] * 2]
    expected = [model.predict(b, samples=8)[NUMBERS].to_numpy(float) for b in batches]
    assert not np.allclose(expected[0][:4], expected[1][:4])  # different work in each thread
    got: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(k: int) -> None:
        try:
            start.wait()
            for rep in range(3):
                got[k, rep] = model.predict(batches[k], samples=8)[NUMBERS].to_numpy(float)
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(got) == 6
    for (k, _), frame in got.items():
        np.testing.assert_allclose(frame, expected[k], atol=1e-6, rtol=0)
