"""Frozen-prefix features for SevenNet: run the interaction blocks before the first adapted one once
per crystal, keep the node and edge tensors entering that block, and let training and prediction
run only the remaining blocks (same idea as :mod:`matbalora.backbones.chgnet_prefix`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from matbalora.backbones import prefix_batch_block
from matbalora.backbones.sevennet import _embed, _State, block_names, first_adapted_block, run_blocks


@dataclass
class SevenNetPrefix:
    """One crystal's tensors entering interaction block ``block`` (edge_index local to the crystal)."""

    block: int
    data: dict[str, Tensor]  # x [n_atoms, irreps], node_attr, edge_embedding, edge_attr [n_edges, ...], edge_index [2, n_edges]
    graph_id: str | None = None

    @property
    def rows(self) -> int:
        return int(self.data["x"].shape[0] + self.data["edge_index"].shape[1])


def prefix_block(backbone: nn.Module, method: str) -> int:
    """The block cached features can enter: 0 for ``full``, else the first adapted block (the last
    block when nothing is adapted)."""
    if method == "full":
        return 0
    _, blocks = block_names(backbone)
    return min(first_adapted_block(backbone), len(blocks) - 1)


@torch.no_grad()
def compute_prefixes(backbone: nn.Module, graphs: Sequence, block: int, *, batch_size: int = 32, progress: bool = False) -> list[SevenNetPrefix]:
    """Features of each crystal entering ``block`` (0 < block < n_blocks), computed in batches."""
    _, blocks = block_names(backbone)
    if not 0 < block < len(blocks):
        raise ValueError(f"block={block} must be in 1..{len(blocks) - 1}")
    if first_adapted_block(backbone) < block:
        raise ValueError(f"block={block} lies after the first adapted block {first_adapted_block(backbone)}: those features are not frozen")
    out: list[SevenNetPrefix] = []
    starts = range(0, len(graphs), batch_size)
    for s in tqdm(starts, desc=f"frozen features to block {block}", unit="batch", disable=not progress):
        part = graphs[s : s + batch_size]
        state = run_blocks(backbone, _embed(backbone, part), start=0, stop=block)
        counts = state.counts()
        edge_owner = state.owners[state.data["edge_index"][0]]
        atom0 = 0
        for c, graph in enumerate(part):
            edges = edge_owner == c
            data = {k: v[edges].clone() if k in ("edge_embedding", "edge_attr") else v[atom0 : atom0 + counts[c]].clone() for k, v in state.data.items() if k != "edge_index"}
            data["edge_index"] = state.data["edge_index"][:, edges] - atom0
            out.append(SevenNetPrefix(block, data, getattr(graph, "graph_id", None)))
            atom0 += counts[c]
    return out


def collate_prefixes(backbone: nn.Module, items: Sequence[SevenNetPrefix]) -> _State:
    """Batch prefixes into the state the remaining blocks take (edge indices shifted per crystal)."""
    prefix_batch_block(items, first_adapted_block(backbone))
    n_atoms = [p.data["x"].shape[0] for p in items]
    offsets = torch.tensor([0] + n_atoms[:-1], dtype=torch.long).cumsum(0).tolist()
    data = {k: torch.cat([p.data[k] for p in items]) for k in items[0].data if k != "edge_index"}
    data["edge_index"] = torch.cat([p.data["edge_index"] + off for p, off in zip(items, offsets)], dim=1)
    owners = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(n_atoms, dtype=torch.long))
    return _State(data, owners, len(items))
