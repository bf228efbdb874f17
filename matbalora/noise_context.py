"""Per-thread sampling state of a model's BaLoRA layers: mode, row layout, generator, noise bank.

One :class:`NoiseContext` is shared by all BaLoRA layers of a model (``BandGapModel.context``); the
backbone sets the row layout of a forward on it, the layers read it. The state is held per thread,
so two threads can run one model at once without a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

SampleMode = Literal["mean", "sample"]


class _NoiseState:
    """One thread's sampling state (see :class:`NoiseContext`)."""

    def __init__(self) -> None:
        self.mode: SampleMode = "mean"
        self.owners: dict[str, Tensor] = {}
        self.n_groups: int | None = None
        self.segments: dict[str, list[int]] = {}  # row kind -> rows of each crystal in one tile
        self.tiles: int = 1  # S: the batch is repeated this many times, tile-major
        self.generator: torch.Generator | None = None
        #: per-crystal noise drawn before a forward (``drawn``): BaLoRA layer -> eps [S * C, r, d_in]
        self.bank: dict[nn.Module, Tensor] = {}


def _per_thread(name: str) -> property:
    return property(lambda self: getattr(self._state(), name), lambda self, value: setattr(self._state(), name, value))


class NoiseContext:
    """The switch for BaLoRA sampling: mode, row->group owners, generator and noise bank.

    The state is held per thread (each thread that calls a model sees its own), so two threads can
    predict with one model at once without a lock: a forward sets and reads only its own thread's rows.
    """

    mode = _per_thread("mode")
    owners = _per_thread("owners")
    n_groups = _per_thread("n_groups")
    segments = _per_thread("segments")
    tiles = _per_thread("tiles")
    generator = _per_thread("generator")
    bank = _per_thread("bank")

    def __init__(self) -> None:
        self._local = threading.local()

    def _state(self) -> _NoiseState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _NoiseState()
        return state

    def clear_rows(self) -> None:
        """Forget the row layout of the last forward."""
        self.owners, self.n_groups, self.segments, self.tiles = {}, None, {}, 1

    @contextmanager
    def sampling(self, mode: SampleMode = "sample", generator: torch.Generator | None = None) -> Iterator[None]:
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode={mode!r}; choose 'mean' or 'sample'")
        old = (self.mode, self.generator)
        self.mode, self.generator = mode, generator if generator is not None else self.generator
        try:
            yield
        finally:
            self.mode, self.generator = old

    @contextmanager
    def drawn(self, bank: dict[nn.Module, Tensor]) -> Iterator[None]:
        """Use the noise in ``bank`` (see :func:`noise_bank`) instead of the generator for one forward."""
        old, self.bank = self.bank, bank
        try:
            yield
        finally:
            self.bank = old
