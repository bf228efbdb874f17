"""Frozen-prefix features: run CHGNet's blocks before the first adapted one once per crystal, keep
the result, and let training and prediction run only the adapted blocks.

When adapters sit only in later message-passing blocks, everything before them (embeddings, basis
expansions, the earlier blocks) is frozen, so its output per crystal never changes during
fine-tuning. :func:`compute_prefixes` stores that output as :class:`PrefixGraph` objects;
:func:`~matbalora.backbones.chgnet.crystal_features` accepts them in place of CrystalGraphs and
runs only blocks ``block..n_conv-1``. The same prefixes serve every model that shares the frozen
backbone (all ensemble members, every epoch, every Monte-Carlo draw).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from matbalora.backbones import prefix_batch_block
from matbalora.backbones.chgnet import _embed, _run_blocks, _State, first_adapted_block


@dataclass
class PrefixGraph:
    """One crystal's features entering message-passing block ``block`` (local indices)."""

    block: int
    atom: Tensor  # [n_atoms, d]
    bond: Tensor  # [n_undirected, d]
    bond_w_ag: Tensor  # [n_undirected, d]
    atom_graph: Tensor  # [n_directed, 2]
    d2u: Tensor  # [n_directed]
    angle: Tensor | None = None  # [n_angles, d]; None when only the last block remains (it uses no angles)
    bond_w_bg: Tensor | None = None
    bond_graph: Tensor | None = None  # [n_angles, 3]
    graph_id: str | None = None

    @property
    def rows(self) -> int:
        """Feature rows the remaining blocks process (atoms + directed bonds + angles)."""
        return int(self.atom.shape[0] + self.atom_graph.shape[0] + (0 if self.bond_graph is None else self.bond_graph.shape[0]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))


def prefix_block(backbone: nn.Module, method: str) -> int:
    """The block at which cached features can enter: 0 (no caching) unless the backbone is frozen
    up to its first adapted block. ``head`` (everything frozen) caches up to the last block."""
    if method == "full":
        return 0
    return min(first_adapted_block(backbone), backbone.n_conv - 1)


def _check_frozen(backbone: nn.Module, block: int) -> None:
    names = ["atom_embedding", "bond_embedding", "angle_embedding", "bond_weights_ag", "bond_weights_bg"]
    names += [f"{kind}.{i}" for i in range(block) for kind in ("atom_conv_layers", "bond_conv_layers", "angle_layers")]
    for name in names:
        try:
            sub = backbone.get_submodule(name)
        except AttributeError:
            continue
        if sub is not None and any(p.requires_grad for p in sub.parameters()):
            raise ValueError(f"cannot cache features up to block {block}: {name} is trainable, its output would go stale")


@torch.no_grad()
def compute_prefixes(backbone: nn.Module, graphs: Sequence, block: int, *, batch_size: int = 32, progress: bool = True) -> list[PrefixGraph]:
    """Features of each crystal entering ``block`` (0 < block < n_conv), computed in batches."""
    if not 0 < block < backbone.n_conv:
        raise ValueError(f"block={block} must be in 1..{backbone.n_conv - 1}")
    if first_adapted_block(backbone) < block:
        raise ValueError(f"block={block} lies after the first adapted block {first_adapted_block(backbone)}: those features are not frozen")
    _check_frozen(backbone, block)
    last = block == backbone.n_conv - 1
    out: list[PrefixGraph] = []
    starts = range(0, len(graphs), batch_size)
    for s in tqdm(starts, desc=f"frozen features to block {block}", unit="batch", disable=not progress):
        part = graphs[s : s + batch_size]
        state = _run_blocks(backbone, _embed(backbone, part), start=0, stop=block)
        out.extend(_split(state, part, block, last))
    return out


def _split(state: _State, graphs: Sequence, block: int, last: bool) -> list[PrefixGraph]:
    out = []
    a0 = u0 = d0 = g0 = 0
    for graph in graphs:
        na, nd = int(graph.atomic_number.shape[0]), int(graph.atom_graph.reshape(-1, 2).shape[0])
        nu, ng = int(graph.undirected2directed.shape[0]), int(graph.bond_graph.shape[0]) if graph.bond_graph.dim() == 2 else 0
        item = PrefixGraph(
            block=block,
            atom=state.atom[a0 : a0 + na].clone(),
            bond=state.bond[u0 : u0 + nu].clone(),
            bond_w_ag=state.bond_w_ag[u0 : u0 + nu].clone(),
            atom_graph=state.atom_graph[d0 : d0 + nd] - a0,
            d2u=state.d2u[d0 : d0 + nd] - u0,
            graph_id=getattr(graph, "graph_id", None),
        )
        if not last:
            bg = state.bond_graph[g0 : g0 + ng].clone()
            if ng:
                bg[:, 0] -= a0
                bg[:, 1:] -= u0
            item.angle = state.angle[g0 : g0 + ng].clone() if state.angle is not None else torch.zeros(0, state.atom.shape[1])
            item.bond_w_bg = state.bond_w_bg[u0 : u0 + nu].clone()
            item.bond_graph = bg
        out.append(item)
        a0, u0, d0, g0 = a0 + na, u0 + nu, d0 + nd, g0 + ng
    return out


def collate_prefixes(backbone: nn.Module, items: Sequence[PrefixGraph]) -> _State:
    """Batch prefixes into the state the remaining blocks take (indices shifted per crystal)."""
    prefix_batch_block(items, first_adapted_block(backbone))
    n_atoms = [p.atom.shape[0] for p in items]
    n_und = [p.bond.shape[0] for p in items]
    atom_off = torch.tensor([0] + n_atoms[:-1]).cumsum(0).tolist()
    und_off = torch.tensor([0] + n_und[:-1]).cumsum(0).tolist()
    with_angles = items[0].bond_graph is not None
    bond_graph = torch.zeros(0, 3, dtype=torch.long)
    if with_angles:
        parts = [p.bond_graph + torch.tensor([a, u, u]) for p, a, u in zip(items, atom_off, und_off)]
        bond_graph = torch.cat(parts) if parts else bond_graph
    return _State(
        atom=torch.cat([p.atom for p in items]),
        bond=torch.cat([p.bond for p in items]),
        angle=torch.cat([p.angle for p in items]) if with_angles and bond_graph.numel() else None,
        bond_w_ag=torch.cat([p.bond_w_ag for p in items]),
        bond_w_bg=torch.cat([p.bond_w_bg for p in items]) if with_angles else torch.zeros(0),
        atom_graph=torch.cat([p.atom_graph + a for p, a in zip(items, atom_off)]),
        bond_graph=bond_graph,
        d2u=torch.cat([p.d2u + u for p, u in zip(items, und_off)]),
        atom_owners=torch.repeat_interleave(torch.arange(len(items)), torch.tensor(n_atoms)),
        n_groups=len(items),
    )
