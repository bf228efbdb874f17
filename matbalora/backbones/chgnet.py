"""CHGNet as a band-gap feature extractor: load from a checkpoint, convert, and run message passing.

The forward replicates CHGNet's own ``_compute`` up to the normalised atom features, with two
additions: it tells every adapter which crystal (group) each of its input rows belongs to, and it
can tile the batch ``samples`` times right before the first adapted block, so that S Monte-Carlo
draws run as one vectorised forward while the embeddings and the frozen prefix are computed once.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matbalora.adapters import LoRALinear, NoiseContext, inject_adapters
from matbalora.config import CHGNET_MESSAGE_PASSING

log = logging.getLogger(__name__)

BACKBONE_NAME = "chgnet"
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


# The backbone-family interface (see ``matbalora.model.backbone_family``): every family module offers
# load, package_version, backbone_version, inject, feature_dim, structure_to_graph, graph_rows,
# crystal_features, prefix_module and DEFAULT_TARGETS.
load = load_chgnet


def package_version() -> str:
    return chgnet_version()


def inject(backbone: nn.Module, config, context: NoiseContext) -> None:
    """Wrap the selected nn.Linear layers with LoRA/BaLoRA and tell each which rows it sees."""
    inject_adapters(backbone, config, context)
    assign_row_kinds(backbone)


def feature_dim(backbone: nn.Module) -> int:
    return int(backbone.atom_fea_dim)


def structure_to_graph(backbone: nn.Module, structure, graph_id: str | None = None):
    """pymatgen Structure -> CHGNet CrystalGraph (the backbone's own converter and cutoffs)."""
    return backbone.graph_converter(structure, graph_id=graph_id)


def prefix_module():
    """The module that caches this family's frozen-prefix features."""
    from matbalora.backbones import chgnet_prefix

    return chgnet_prefix


def backbone_version(model: nn.Module) -> str:
    """The checkpoint version string CHGNet records (e.g. '0.3.0'), or 'custom'."""
    return str(getattr(model, "version", None) or "custom")


def assign_row_kinds(backbone: nn.Module) -> None:
    """Tell each adapter in ``backbone`` which row kind it sees (needed for per-crystal draws)."""
    for path, module in backbone.named_modules():
        if isinstance(module, LoRALinear):
            kind = next((k for pattern, k in ROW_KINDS if re.fullmatch(pattern, path)), None)
            if kind is None:
                raise ValueError(f"adapter at {path!r} is outside CHGNet's message-passing blocks")
            module.row_kind = kind


def graph_rows(graph) -> int:
    """Feature rows one CrystalGraph puts through message passing: atoms + directed bonds + angles
    (for a cached prefix, the rows its remaining blocks process).

    Activation memory and compute of a forward grow with this count (per Monte-Carlo sample), not
    with the number of crystals: a 1,000-atom framework has ~100x the rows of a 10-atom cell.
    """
    rows = getattr(graph, "rows", None)
    if rows is not None:
        return int(rows)
    return int(graph.atomic_number.shape[0] + graph.atom_graph.shape[0] + graph.bond_graph.shape[0])


def first_adapted_block(backbone: nn.Module) -> int:
    """Index of the first message-passing block holding an adapter (n_conv if none)."""
    n_conv = backbone.n_conv
    for idx in range(n_conv):
        names = [f"atom_conv_layers.{idx}"]
        if idx < n_conv - 1:
            names += [f"bond_conv_layers.{idx}", f"angle_layers.{idx}"]
        for name in names:
            try:
                sub = backbone.get_submodule(name)
            except AttributeError:
                continue
            if any(isinstance(m, LoRALinear) for m in sub.modules()):
                return idx
    return n_conv


def adapted_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The message-passing modules from the first adapted block on (what runs after a cached prefix)."""
    out = []
    for idx in range(first_adapted_block(backbone), backbone.n_conv):
        for name in ("atom_conv_layers", "bond_conv_layers", "angle_layers"):
            layers = getattr(backbone, name, None)
            if layers is not None and idx < len(layers) and layers[idx] is not None:
                out.append(layers[idx])
    return out


@dataclass
class _State:
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

    def tile(self, times: int) -> _State:
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

        return _State(
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

    def cast(self, dtype: torch.dtype) -> _State:
        """The same state with its float features in ``dtype`` (index tensors unchanged)."""

        def c(t: Tensor | None) -> Tensor | None:
            return t if t is None or not t.is_floating_point() else t.to(dtype)

        return _State(c(self.atom), c(self.bond), c(self.angle), c(self.bond_w_ag), c(self.bond_w_bg),
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


def _embed(backbone: nn.Module, graphs: Sequence) -> _State:
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
    return _State(
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


def _run_blocks(
    backbone: nn.Module, state: _State, *, start: int, stop: int, samples: int = 1, context: NoiseContext | None = None
) -> _State:
    """Message-passing blocks ``start:stop``; with ``context``, the batch is tiled ``samples`` times
    before the first adapted block and every adapter is told which group owns each of its rows."""
    n_conv = backbone.n_conv
    tile_at = max(start, min(first_adapted_block(backbone), n_conv - 1)) if samples > 1 else start
    for idx in range(start, stop):
        if idx == tile_at and context is not None:
            segments = state.segments()
            state = state.tile(samples)
            context.owners, context.n_groups = state.owners(), state.n_groups
            context.segments, context.tiles = segments, samples
        elif idx == tile_at:
            state = state.tile(samples)
        state.atom = backbone.atom_conv_layers[idx](
            atom_feas=state.atom,
            bond_feas=state.bond,
            bond_weights=state.bond_w_ag,
            atom_graph=state.atom_graph,
            directed2undirected=state.d2u,
        )
        if idx == n_conv - 1 or state.angle is None:
            continue
        bond_layer, angle_layer = backbone.bond_conv_layers[idx], backbone.angle_layers[idx]
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


def crystal_features(
    backbone: nn.Module,
    graphs: Sequence,
    *,
    samples: int = 1,
    context: NoiseContext | None = None,
    pooling: str = "mean",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Mean-pooled, normalised final atom features  [samples, n_crystals, atom_fea_dim].

    ``graphs``: CHGNet CrystalGraphs, or :class:`~matbalora.backbones.chgnet_prefix.PrefixGraph`
    objects (features cached at the entry of a later block: only the remaining blocks run).
    ``samples`` > 1 tiles the batch before the first adapted block; each (sample, crystal) pair is
    its own group, so BaLoRA draws one adapter weight set per crystal per sample.
    ``pooling``: ``mean`` or ``mean_max`` (2 x atom_fea_dim features). ``dtype``: the dtype the
    adapted blocks run in (see ``BandGapModel.compute_in``; only for cached-prefix inputs); the
    pooled features are always float32.
    """
    from matbalora.backbones import prefix_batch_block
    from matbalora.backbones.chgnet_prefix import PrefixGraph, collate_prefixes
    from matbalora.backbones.prefix_store import PrefixBatch

    if isinstance(graphs, PrefixBatch):  # already collated (out-of-core training batches)
        start, state = prefix_batch_block([graphs], first_adapted_block(backbone)), graphs.state
    elif graphs and isinstance(graphs[0], PrefixGraph):
        start = graphs[0].block
        state = collate_prefixes(backbone, graphs)
    else:
        start, state = 0, _embed(backbone, graphs)
    if dtype != torch.float32:
        if start == 0:
            raise ValueError(f"dtype={dtype} needs cached frozen-prefix inputs; full graphs run in float32")
        state = state.cast(dtype)
    try:
        state = _run_blocks(backbone, state, start=start, stop=backbone.n_conv, samples=samples, context=context)
    finally:
        if context is not None:
            context.clear_rows()
    atom = state.atom.float()
    atom = backbone.readout_norm(atom) if backbone.readout_norm is not None else atom
    from matbalora.backbones import pool_atoms

    pooled = pool_atoms(atom, state.atom_owners, state.n_groups, pooling)
    return pooled.reshape(samples, len(graphs), -1)
