"""The backbone interface: what differs per family (:class:`Backbone`'s hooks) and the one loop that
is the same for every family (tiling for Monte-Carlo draws, the noise context's row layout, frozen
prefix caching and collation, pooling).

A family module (``chgnet.py``, ``sevennet.py``) subclasses :class:`Backbone`, fills in the hooks,
and is named in the registry of :mod:`matbalora.backbones`. ``net`` below is the family's own
``nn.Module`` (a CHGNet, a SevenNet); a ``state`` is the family's batch of features entering a block,
with ``tile(times)`` (the batch repeated tile-major) and ``n_groups`` (crystals x tiles).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from matbalora.adapters import LINEAR_WRAPPERS, LoRALinear, inject_adapters
from matbalora.noise_context import NoiseContext
from matbalora.data.validation import GraphLimits


@dataclass
class PrefixBatch:
    """Collated frozen-prefix features of a batch, ready for the remaining blocks (a family's
    ``state``, as :meth:`Backbone.collate_prefixes` returns it, e.g. gathered from a prefix store)."""

    block: int
    state: object
    n: int

    def __len__(self) -> int:
        return self.n


def prefix_batch_block(items: Sequence, first_adapted: int) -> int:
    """The block a batch of cached frozen-prefix features enters at.

    Refuses a batch that mixes blocks, and a model that adapts a block before it (those cached
    features would be stale).
    """
    block = items[0].block
    if any(p.block != block for p in items):
        raise ValueError("a batch mixes prefixes cached at different blocks")
    if first_adapted < block:
        raise ValueError(f"features were cached up to block {block}, but this model adapts block {first_adapted}")
    return block


def pool_atoms(x: Tensor, owners: Tensor, n_groups: int, how: str = "mean") -> Tensor:
    """Per-crystal pooling of atom features  x [n_atoms, d] -> [n_groups, d] (``mean``) or
    [n_groups, 2 d] (``mean_max``: mean and element-wise max, concatenated). ``owners`` [n_atoms]."""
    sums = x.new_zeros(n_groups, x.shape[1]).index_add_(0, owners, x)
    counts = torch.bincount(owners, minlength=n_groups).clamp_min(1).to(x.dtype)
    mean = sums / counts[:, None]
    if how == "mean":
        return mean
    if how != "mean_max":
        raise ValueError(f"pooling={how!r}; choose 'mean' or 'mean_max'")
    index = owners[:, None].expand_as(x)
    peak = x.new_full((n_groups, x.shape[1]), float("-inf")).scatter_reduce(0, index, x, reduce="amax", include_self=True)
    return torch.cat([mean, torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))], dim=1)


class Backbone:
    """One pretrained family. Subclasses set the class attributes and implement the hooks marked
    *family*; the other methods are the shared loop and should not need overriding."""

    #: registry name, recorded in model folders
    name: ClassVar[str]
    #: adapter targets (regex on module paths) when the user gives none
    default_targets: ClassVar[tuple[str, ...]]
    #: the class of one crystal's cached frozen-prefix features
    prefix_type: ClassVar[type]
    #: whether the adapted blocks may run in a lower precision on cached prefixes (``BandGapModel.compute_in``)
    low_precision: ClassVar[bool] = False

    # ----------------------------------------------------------------------------- family: loading
    def load(self, checkpoint: str | os.PathLike | None = None) -> nn.Module:
        """The pretrained network of the family's wheel (None) or a checkpoint file, never unpickling objects."""
        raise NotImplementedError

    def package_version(self) -> str:
        raise NotImplementedError

    def backbone_version(self, net: nn.Module) -> str:
        """The version string model folders record and check (e.g. '0.3.0', or 'custom')."""
        return str(getattr(net, "version", None) or "custom")

    # ----------------------------------------------------------------------------- family: data
    def limits(self, net: nn.Module) -> GraphLimits:
        """Cutoffs and elements the data checks need so that every admitted structure converts."""
        raise NotImplementedError

    def structure_to_graph(self, net: nn.Module, structure, graph_id: str | None = None):
        """pymatgen Structure -> the family's graph (its own converter and cutoff)."""
        raise NotImplementedError

    def graphs(self, net: nn.Module, structures: Sequence, ids: Sequence[str], *, cache_dir=None, workers: int = 1, progress: bool = False) -> list:
        """Graphs of ``structures`` for training; families with an on-disk graph cache override this."""
        from tqdm.auto import tqdm

        pairs = list(zip(structures, ids))
        return [self.structure_to_graph(net, s, graph_id=i) for s, i in tqdm(pairs, desc=f"{self.name} graphs", disable=not progress)]

    def graph_rows(self, graph) -> int:
        """Feature rows one graph (or cached prefix) puts through message passing; memory grows with it."""
        return int(graph.rows)

    # ----------------------------------------------------------------------------- family: adapters, training state
    def inject(self, net: nn.Module, config, context: NoiseContext) -> None:
        """Wrap the layers that ``config`` selects with LoRA/BaLoRA (the one injector, this family's wrappers)."""
        inject_adapters(net, config, context, wrappers=self.wrappers())

    def wrappers(self) -> dict[type, Any]:
        """Layer type -> adapter wrapper ``(base, config, context) -> module`` (``adapters.inject_adapters``)."""
        return dict(LINEAR_WRAPPERS)

    def frozen_modules(self, net: nn.Module, method: str) -> list[nn.Module]:
        """Submodules kept frozen under training ``method`` even where it trains the backbone (an unused readout)."""
        return []

    def feature_dim(self, net: nn.Module) -> int:
        """Width of the pooled per-atom features (before ``mean_max`` doubles it)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- family: forward
    def n_blocks(self, net: nn.Module) -> int:
        raise NotImplementedError

    def block_modules(self, net: nn.Module, idx: int) -> list[nn.Module]:
        """The modules of message-passing block ``idx``."""
        raise NotImplementedError

    def embedding_modules(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of everything computed before block 0."""
        raise NotImplementedError

    def embed(self, net: nn.Module, graphs: Sequence):
        """The state entering block 0 of a batch of graphs."""
        raise NotImplementedError

    def run_block(self, net: nn.Module, state, idx: int):
        """The state leaving block ``idx``."""
        raise NotImplementedError

    def row_layout(self, net: nn.Module, state, tiled) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """(row kind -> group of each row of ``tiled``, row kind -> rows per crystal of ``state``) for
        the adapters' per-crystal draws; ``tiled`` is ``state`` repeated tile-major."""
        raise NotImplementedError

    def readout(self, net: nn.Module, state) -> tuple[Tensor, Tensor, int]:
        """(invariant atom features [n_atoms, d] float32, owners [n_atoms], n_groups) after the last block."""
        raise NotImplementedError

    def split_prefixes(self, net: nn.Module, state, graphs: Sequence, block: int) -> list:
        """One ``prefix_type`` per crystal of a batch's ``state`` entering ``block`` (local indices)."""
        raise NotImplementedError

    def collate(self, net: nn.Module, items: Sequence):
        """The state of a batch of cached prefixes (indices shifted per crystal)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- shared loop
    def first_adapted_block(self, net: nn.Module) -> int:
        """Index of the first block holding an adapter (n_blocks if none)."""
        for idx in range(self.n_blocks(net)):
            if any(isinstance(m, LoRALinear) for sub in self.block_modules(net, idx) for m in sub.modules()):
                return idx
        return self.n_blocks(net)

    def adapted_blocks(self, net: nn.Module) -> list[nn.Module]:
        """The block modules from the first adapted block on (what runs after a cached prefix)."""
        return [m for idx in range(self.first_adapted_block(net), self.n_blocks(net)) for m in self.block_modules(net, idx)]

    def run_blocks(self, net: nn.Module, state, *, start: int, stop: int, samples: int = 1, context: NoiseContext | None = None):
        """Blocks ``start:stop``; the batch is tiled ``samples`` times before the first adapted block
        and, with ``context``, every adapter is told which group owns each of its rows."""
        n_blocks = self.n_blocks(net)
        tile_at = max(start, min(self.first_adapted_block(net), n_blocks - 1)) if samples > 1 else start
        for idx in range(start, stop):
            if idx == tile_at:
                tiled = state.tile(samples)
                if context is not None:
                    owners, segments = self.row_layout(net, state, tiled)
                    context.owners, context.n_groups = owners, tiled.n_groups
                    context.segments, context.tiles = segments, samples
                state = tiled
            state = self.run_block(net, state, idx)
        return state

    def entry(self, net: nn.Module, graphs) -> tuple[int, Any]:
        """(block, state) a batch enters at: graphs at 0, cached prefixes at their block."""
        if isinstance(graphs, PrefixBatch):  # already collated (out-of-core training batches)
            return prefix_batch_block([graphs], self.first_adapted_block(net)), graphs.state
        if graphs and isinstance(graphs[0], self.prefix_type):
            return graphs[0].block, self.collate_prefixes(net, graphs)
        return 0, self.embed(net, graphs)

    def crystal_features(self, net: nn.Module, graphs, *, samples: int = 1, context: NoiseContext | None = None,
                         pooling: str = "mean", dtype: torch.dtype = torch.float32) -> Tensor:
        """Pooled final invariant atom features  [samples, n_crystals, d] (``mean_max``: 2 d).

        ``graphs``: the family's graphs, its cached prefixes (only the remaining blocks run), or a
        :class:`PrefixBatch`. ``samples`` > 1 tiles the batch before the first adapted block; each
        (sample, crystal) pair is its own group, so BaLoRA draws one adapter weight set per crystal
        per sample. ``dtype``: of the adapted blocks (``BandGapModel.compute_in``; cached prefixes
        only); the pooled features are float32.
        """
        if dtype != torch.float32 and not self.low_precision:
            raise ValueError(f"dtype={dtype}: {self.name} blocks run in float32 only")
        start, state = self.entry(net, graphs)
        if dtype != torch.float32:
            if start == 0:
                raise ValueError(f"dtype={dtype} needs cached frozen-prefix inputs; full graphs run in float32")
            state = state.cast(dtype)
        try:
            state = self.run_blocks(net, state, start=start, stop=self.n_blocks(net), samples=samples, context=context)
        finally:
            if context is not None:
                context.clear_rows()
        x, owners, n_groups = self.readout(net, state)
        return pool_atoms(x, owners, n_groups, pooling).reshape(samples, len(graphs), -1)

    def prefix_block(self, net: nn.Module, method: str) -> int:
        """The block cached features can enter: 0 (no caching) for ``full``, else the first adapted
        block (the last block when nothing is adapted, as for ``head``)."""
        if method == "full":
            return 0
        return min(self.first_adapted_block(net), self.n_blocks(net) - 1)

    def check_frozen(self, net: nn.Module, block: int) -> None:
        """Refuse caching up to ``block`` when anything before it is trainable (its output would go stale)."""
        paths = {id(m): path for path, m in net.named_modules()}
        names = list(self.embedding_modules(net))
        names += [(paths.get(id(m), f"block {i}"), m) for i in range(block) for m in self.block_modules(net, i)]
        for name, sub in names:
            if sub is not None and any(p.requires_grad for p in sub.parameters()):
                raise ValueError(f"cannot cache features up to block {block}: {name} is trainable, its output would go stale")

    @torch.no_grad()
    def compute_prefixes(self, net: nn.Module, graphs: Sequence, block: int, *, batch_size: int = 32, progress: bool = False) -> list:
        """Features of each crystal entering ``block`` (0 < block < n_blocks), computed in batches."""
        from tqdm.auto import tqdm

        if not 0 < block < self.n_blocks(net):
            raise ValueError(f"block={block} must be in 1..{self.n_blocks(net) - 1}")
        first = self.first_adapted_block(net)
        if first < block:
            raise ValueError(f"block={block} lies after the first adapted block {first}: those features are not frozen")
        self.check_frozen(net, block)
        out: list = []
        for s in tqdm(range(0, len(graphs), batch_size), desc=f"frozen features to block {block}", unit="batch", disable=not progress):
            part = graphs[s : s + batch_size]
            state = self.run_blocks(net, self.embed(net, part), start=0, stop=block)
            out.extend(self.split_prefixes(net, state, part, block))
        return out

    def collate_prefixes(self, net: nn.Module, items: Sequence):
        """The state of a batch of cached prefixes; refuses mixed blocks and stale features."""
        prefix_batch_block(items, self.first_adapted_block(net))
        return self.collate(net, items)

