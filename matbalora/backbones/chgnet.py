"""CHGNet as a band-gap feature extractor: load from a checkpoint, convert (through the on-disk graph
cache), run message passing, and cache frozen-prefix features.

The forward replicates CHGNet's own ``_compute`` up to the normalised atom features; the shared loop
of :class:`~matbalora.backbones.base.Backbone` adds what every family does (tiling for draws, the
adapters' row layout, prefix caching, pooling). Frozen-prefix features of one crystal are a
:class:`PrefixGraph`: everything before the first adapted block (embeddings, basis expansions, the
earlier blocks) is frozen, so it is computed once and serves every model sharing the frozen backbone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matbalora.adapters import LoRALinear
from matbalora.noise_context import NoiseContext
from matbalora.backbones.base import Backbone
from matbalora.config import CHGNET_MESSAGE_PASSING
from matbalora.data.validation import GraphLimits

log = logging.getLogger(__name__)

PRETRAINED_VERSION = "0.3.0"
#: adapter targets of this family (``AdapterConfig.last_blocks`` then keeps the last block by default)
DEFAULT_TARGETS = CHGNET_MESSAGE_PASSING

#: Which rows each CHGNet linear sees (regex on the module path -> row kind).
ROW_KINDS: tuple[tuple[str, str], ...] = (
    (r"atom_conv_layers\.\d+\.twoBody_atom\..*", "directed_bond"),
    (r"atom_conv_layers\.\d+\.mlp_out\..*", "atom"),
    (r"bond_conv_layers\.\d+\.twoBody_bond\..*", "angle"),
    (r"bond_conv_layers\.\d+\.mlp_out\..*", "undirected_bond"),
    (r"angle_layers\.\d+\.twoBody_bond\..*", "angle"),
)


def chgnet_version() -> str:
    import chgnet

    return str(chgnet.__version__)


def load_chgnet(checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The pretrained CHGNet 0.3.0 shipped in the ``chgnet`` wheel, or a CHGNet checkpoint file.

    A checkpoint file is read with ``torch.load(weights_only=True)`` (tensors and plain containers
    only): a file that would need unpickling arbitrary objects is refused, never executed.
    """
    import contextlib
    import io

    from chgnet.model import CHGNet

    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints on construction
        if checkpoint is None:
            model = CHGNet.load(model_name=PRETRAINED_VERSION, use_device="cpu", verbose=False)
        else:
            path = os.fspath(checkpoint)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"CHGNet checkpoint {path!r} does not exist")
            import torch

            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # UnpicklingError for anything beyond tensors and plain containers
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise ValueError(
                    f"{path}: backbone checkpoint refused, it is not plain tensors and containers ({type(exc).__name__}: {first})"
                ) from None
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError(f"{path}: not a CHGNet checkpoint (no 'model' entry)")
            try:
                model = CHGNet.from_dict(state["model"])
            except Exception as exc:
                raise ValueError(f"{path}: not a CHGNet checkpoint ({type(exc).__name__}: {exc})") from None
    return model.eval()


def assign_row_kinds(backbone: nn.Module) -> None:
    """Tell each adapter in ``backbone`` which row kind it sees (needed for per-crystal draws)."""
    for path, module in backbone.named_modules():
        if isinstance(module, LoRALinear):
            kind = next((k for pattern, k in ROW_KINDS if re.fullmatch(pattern, path)), None)
            if kind is None:
                raise ValueError(f"adapter at {path!r} is outside CHGNet's message-passing blocks")
            module.row_kind = kind


@dataclass
class State:
    """Features and index tensors of one batch (possibly tiled over samples)."""

    atom: Tensor  # [n_atoms, d]
    bond: Tensor  # [n_undirected, d]
    angle: Tensor | None  # [n_angles, d]
    bond_w_ag: Tensor
    bond_w_bg: Tensor
    atom_graph: Tensor  # [n_directed, 2]
    bond_graph: Tensor  # [n_angles, 3]
    d2u: Tensor  # [n_directed]
    atom_owners: Tensor  # [n_atoms] group index
    n_groups: int

    def tile(self, times: int) -> State:
        if times == 1:
            return self
        n_atoms, n_und = self.atom.shape[0], self.bond.shape[0]

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        def shifted(t: Tensor, shifts: Sequence[int]) -> Tensor:
            if t.numel() == 0:
                return t
            step = torch.tensor(shifts, dtype=t.dtype, device=t.device)
            offs = torch.arange(times, device=t.device, dtype=t.dtype)[:, None, None] * step
            return (t.unsqueeze(0) + offs).reshape(-1, t.shape[1])

        return State(
            atom=rep(self.atom),
            bond=rep(self.bond),
            angle=rep(self.angle),
            bond_w_ag=rep(self.bond_w_ag),
            bond_w_bg=rep(self.bond_w_bg),
            atom_graph=shifted(self.atom_graph, [n_atoms, n_atoms]),
            bond_graph=shifted(self.bond_graph, [n_atoms, n_und, n_und]) if self.bond_graph.numel() else self.bond_graph,
            d2u=(self.d2u.unsqueeze(0) + n_und * torch.arange(times, device=self.d2u.device)[:, None]).reshape(-1),
            atom_owners=(self.atom_owners.unsqueeze(0) + self.n_groups * torch.arange(times, device=self.d2u.device)[:, None]).reshape(-1),
            n_groups=self.n_groups * times,
        )

    def cast(self, dtype: torch.dtype) -> State:
        """The same state with its float features in ``dtype`` (index tensors unchanged)."""

        def c(t: Tensor | None) -> Tensor | None:
            return t if t is None or not t.is_floating_point() else t.to(dtype)

        return State(c(self.atom), c(self.bond), c(self.angle), c(self.bond_w_ag), c(self.bond_w_bg),
                      self.atom_graph, self.bond_graph, self.d2u, self.atom_owners, self.n_groups)

    def owners(self) -> dict[str, Tensor]:
        directed = self.atom_owners[self.atom_graph[:, 0]] if self.atom_graph.numel() else self.atom_owners[:0]
        undirected = torch.zeros(self.bond.shape[0], dtype=self.atom_owners.dtype, device=self.bond.device)
        if directed.numel():
            undirected[self.d2u] = directed
        angle = self.atom_owners[self.bond_graph[:, 0]] if self.bond_graph.numel() else self.atom_owners[:0]
        return {"atom": self.atom_owners, "directed_bond": directed, "undirected_bond": undirected, "angle": angle}

    def segments(self) -> dict[str, list[int]]:
        """Rows per group for each row kind whose rows are sorted by group (the others are left out)."""
        out = {}
        for kind, owners in self.owners().items():
            if owners.numel() < 2 or bool((owners[1:] >= owners[:-1]).all()):
                out[kind] = torch.bincount(owners, minlength=self.n_groups).tolist()
        return out


def _embed(backbone: nn.Module, graphs: Sequence) -> State:
    """Embeddings and basis expansions of a batch of CrystalGraphs: the state entering block 0."""
    from chgnet.model.model import BatchedGraph

    for graph in graphs:  # CHGNet's converter marks coordinates for force/stress gradients: not needed
        if graph.atom_frac_coord.requires_grad or graph.lattice.requires_grad:
            graph.atom_frac_coord = graph.atom_frac_coord.detach()
            graph.lattice = graph.lattice.detach()
    g = BatchedGraph.from_graphs(
        graphs,
        bond_basis_expansion=backbone.bond_basis_expansion,
        angle_basis_expansion=backbone.angle_basis_expansion,
    )
    has_angles = len(g.angle_bases) != 0
    return State(
        atom=backbone.atom_embedding(g.atomic_numbers - 1),
        bond=backbone.bond_embedding(g.bond_bases_ag),
        angle=backbone.angle_embedding(g.angle_bases) if has_angles else None,
        bond_w_ag=backbone.bond_weights_ag(g.bond_bases_ag),
        bond_w_bg=backbone.bond_weights_bg(g.bond_bases_bg),
        atom_graph=g.batched_atom_graph.long(),
        bond_graph=g.batched_bond_graph.long() if has_angles else torch.zeros(0, 3, dtype=torch.long),
        d2u=g.directed2undirected.long(),
        atom_owners=g.atom_owners.long(),
        n_groups=len(graphs),
    )


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


def _split(state: State, graphs: Sequence, block: int, last: bool) -> list[PrefixGraph]:
    """One PrefixGraph per crystal of ``state`` (indices made local to the crystal)."""
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


def _collate(items: Sequence[PrefixGraph]) -> State:
    """Batch prefixes into the state the remaining blocks take (indices shifted per crystal)."""
    n_atoms = [p.atom.shape[0] for p in items]
    n_und = [p.bond.shape[0] for p in items]
    atom_off = torch.tensor([0] + n_atoms[:-1]).cumsum(0).tolist()
    und_off = torch.tensor([0] + n_und[:-1]).cumsum(0).tolist()
    with_angles = items[0].bond_graph is not None
    bond_graph = torch.zeros(0, 3, dtype=torch.long)
    if with_angles:
        parts = [p.bond_graph + torch.tensor([a, u, u]) for p, a, u in zip(items, atom_off, und_off)]
        bond_graph = torch.cat(parts) if parts else bond_graph
    return State(
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


class CHGNetBackbone(Backbone):
    """CHGNet (``chgnet`` package): atom, bond and angle features; adapters on ``nn.Linear``."""

    name = "chgnet"
    default_targets = DEFAULT_TARGETS
    prefix_type = PrefixGraph
    low_precision = True

    load = staticmethod(load_chgnet)
    package_version = staticmethod(chgnet_version)

    def limits(self, net: nn.Module) -> GraphLimits:
        conv = net.graph_converter
        return GraphLimits(cutoff=float(conv.atom_graph_cutoff), bond_cutoff=float(conv.bond_graph_cutoff),
                           max_atomic_number=int(net.atom_embedding.embedding.num_embeddings))

    def structure_to_graph(self, net: nn.Module, structure, graph_id: str | None = None):
        """pymatgen Structure -> CHGNet CrystalGraph (the backbone's own converter and cutoffs)."""
        return net.graph_converter(structure, graph_id=graph_id)

    def graphs(self, net: nn.Module, structures: Sequence, ids: Sequence[str], *, cache_dir=None, workers: int = 1, progress: bool = False) -> list:
        """CrystalGraphs through the on-disk cache (``cache_dir``; None: in memory), reused across runs."""
        from matbalora.data.graph_cache import GraphCache

        cache = GraphCache(cache_dir, converter=net.graph_converter, backbone_version=self.backbone_version(net))
        return cache.graphs(structures, ids=ids, workers=workers, progress=progress)

    def graph_rows(self, graph) -> int:
        """Atoms + directed bonds + angles of a CrystalGraph (for a cached prefix, the rows its
        remaining blocks process): a 1,000-atom framework has ~100x the rows of a 10-atom cell."""
        rows = getattr(graph, "rows", None)
        if rows is not None:
            return int(rows)
        return int(graph.atomic_number.shape[0] + graph.atom_graph.shape[0] + graph.bond_graph.shape[0])

    def inject(self, net: nn.Module, config, context: NoiseContext) -> None:
        """Wrap the selected nn.Linear layers with LoRA/BaLoRA and tell each which rows it sees."""
        super().inject(net, config, context)
        assign_row_kinds(net)

    def frozen_modules(self, net: nn.Module, method: str) -> list[nn.Module]:
        """The unused energy readout (``site_wise``, ``mlp``); in ``full`` also the energy reference."""
        names = ("site_wise", "mlp") + (("composition_model",) if method == "full" else ())
        return [m for m in (getattr(net, n, None) for n in names) if isinstance(m, nn.Module)]

    def feature_dim(self, net: nn.Module) -> int:
        return int(net.atom_fea_dim)

    def n_blocks(self, net: nn.Module) -> int:
        return int(net.n_conv)

    def block_modules(self, net: nn.Module, idx: int) -> list[nn.Module]:
        out = []
        for name in ("atom_conv_layers", "bond_conv_layers", "angle_layers"):
            layers = getattr(net, name, None)
            if layers is not None and idx < len(layers) and layers[idx] is not None:
                out.append(layers[idx])
        return out

    def embedding_modules(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        names = ("atom_embedding", "bond_embedding", "angle_embedding", "bond_weights_ag", "bond_weights_bg")
        return [(n, getattr(net, n)) for n in names if getattr(net, n, None) is not None]

    def embed(self, net: nn.Module, graphs: Sequence) -> State:
        return _embed(net, graphs)

    def run_block(self, net: nn.Module, state: State, idx: int) -> State:
        state.atom = net.atom_conv_layers[idx](
            atom_feas=state.atom,
            bond_feas=state.bond,
            bond_weights=state.bond_w_ag,
            atom_graph=state.atom_graph,
            directed2undirected=state.d2u,
        )
        if idx == net.n_conv - 1 or state.angle is None:
            return state
        bond_layer, angle_layer = net.bond_conv_layers[idx], net.angle_layers[idx]
        if bond_layer is not None:
            state.bond = bond_layer(
                atom_feas=state.atom,
                bond_feas=state.bond,
                bond_weights=state.bond_w_bg,
                angle_feas=state.angle,
                bond_graph=state.bond_graph,
            )
            if angle_layer is not None:
                state.angle = angle_layer(
                    atom_feas=state.atom, bond_feas=state.bond, angle_feas=state.angle, bond_graph=state.bond_graph
                )
        return state

    def row_layout(self, net: nn.Module, state: State, tiled: State) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        return tiled.owners(), state.segments()

    def readout(self, net: nn.Module, state: State) -> tuple[Tensor, Tensor, int]:
        atom = state.atom.float()
        atom = net.readout_norm(atom) if net.readout_norm is not None else atom
        return atom, state.atom_owners, state.n_groups

    def split_prefixes(self, net: nn.Module, state: State, graphs: Sequence, block: int) -> list[PrefixGraph]:
        return _split(state, graphs, block, block == net.n_conv - 1)

    def collate(self, net: nn.Module, items: Sequence[PrefixGraph]) -> State:
        return _collate(items)


#: The family, registered in :mod:`matbalora.backbones` (``FAMILY.compute_prefixes(net, graphs, block)`` etc.).
FAMILY = CHGNetBackbone()
