"""SevenNet (an E(3)-equivariant NequIP-style network, ``sevenn`` package) as a band-gap feature
extractor: load from a checkpoint file, convert structures, and run message passing.

The forward runs SevenNet's own modules (edge embedding, one-hot embedding, then the numbered
interaction blocks ``0_*``, ``1_*``, ...) and stops after the last block: the energy readout is not
used. Crystal features are the mean over atoms of the final *scalar* (``0e``) node channels, so the
predicted gap is invariant under rotations. As for CHGNet, the batch can be tiled ``samples`` times
right before the first adapted block, and every adapter is told which crystal (group) owns each of
its rows (the shared loop of :class:`~matbalora.backbones.base.Backbone`). Adapters on e3nn
``o3.Linear`` layers are :class:`~matbalora.backbones.sevennet_adapters.IrrepsLoRA`, injected by the
one injector (``adapters.inject_adapters``). Frozen-prefix features of one crystal are a
:class:`SevenNetPrefix`.

Checkpoints: SevenNet's ``.pth`` files are torch pickles whose config holds a few numpy float
arrays (per-species shift/scale). They are read with ``torch.load(weights_only=True)`` plus, only
inside that call, an allowlist of exactly the numpy names such arrays need (``_reconstruct``,
``ndarray``, ``dtype`` and the numeric dtype classes); object arrays and every other class are
still refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from matbalora.backbones.base import Backbone
from matbalora.backbones.sevennet_adapters import IrrepsLoRA, adapted_dims
from matbalora.data.validation import GraphLimits

PRETRAINED_NAME = "7net-0"  # SevenNet-0 (11Jul2024), shipped in the sevenn wheel

#: o3.Linear layers inside SevenNet's interaction blocks (module paths, re.fullmatch).
DEFAULT_TARGETS = (r"\d+_(self_interaction_1|self_interaction_2|self_connection_intro)\.linear",)

_BLOCK = re.compile(r"(\d+)_")
_NODE_KEYS = ("x", "node_attr")  # [n_atoms, ...]
_EDGE_KEYS = ("edge_embedding", "edge_attr")  # [n_edges, ...]


def sevenn_version() -> str:
    import sevenn

    return str(sevenn.__version__)


def default_checkpoint() -> str:
    """Path of SevenNet-0 inside the installed sevenn wheel."""
    from sevenn.util import pretrained_name_to_path

    return str(pretrained_name_to_path(PRETRAINED_NAME))


def _numpy_globals() -> list:
    """The numpy names a numeric numpy array in a pickle needs (numpy 1 and numpy 2 spellings)."""
    import numpy as np

    rebuild = np._core.multiarray._reconstruct
    dtypes = [getattr(np.dtypes, f"{k}DType") for k in ("Float16", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "Bool")]
    return [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A SevenNet checkpoint file as a dict, read without unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SevenNet checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors, containers, numeric numpy arrays
        raise ValueError(
            f"{path}: SevenNet checkpoint refused, it holds objects beyond tensors, plain containers and numeric numpy arrays ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or not isinstance(state.get("model_state_dict"), dict):
        raise ValueError(f"{path}: not a SevenNet checkpoint (needs 'config' and 'model_state_dict' entries)")
    return state


def build_from_state(state: dict, source: str) -> nn.Module:
    """An e3nn SevenNet model from a checkpoint dict (what ``sevenn``'s own loader does, minus the pickle)."""
    import sevenn._keys as KEY
    import sevenn.scripts.backward_compatibility as compat
    from sevenn.checkpoint import _config_cp_routine
    from sevenn.model_build import build_E3_equivariant_model

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = _config_cp_routine(dict(state["config"]))
        except Exception as exc:
            raise ValueError(f"{source}: SevenNet checkpoint config is unusable ({type(exc).__name__}: {exc})") from None
        for key in (KEY.USE_MODALITY, KEY.USE_FLASH_TP, KEY.USE_OEQ):
            if config.get(key):
                raise ValueError(f"{source}: SevenNet checkpoints with {key}=True are not supported (plain e3nn models only)")
        if (config.get(KEY.CUEQUIVARIANCE_CONFIG) or {}).get("use"):
            raise ValueError(f"{source}: SevenNet checkpoints built for cuEquivariance are not supported (plain e3nn models only)")
        config["_flash_lammps"], config[KEY.USE_OEQ] = False, False
        try:
            model = build_E3_equivariant_model(config)
            weights = compat.patch_state_dict_if_old(state["model_state_dict"], config, model)
            model.load_state_dict(weights, strict=True)
        except Exception as exc:
            raise ValueError(f"{source}: weights do not fit the SevenNet config ({type(exc).__name__}: {str(exc)[:200]})") from None
    model.set_is_batch_data(True)
    block_names(model)  # refuses layouts this module does not know
    return model.eval()


def load_sevennet(checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """SevenNet-0 from the sevenn wheel (``checkpoint=None``) or a SevenNet checkpoint file.

    The returned module carries ``version``: ``'7net-0'`` for the wheel's checkpoint, ``'custom'``
    for any other file (model folders also record the file's SHA-256).
    """
    path = default_checkpoint() if checkpoint is None else os.fspath(checkpoint)
    model = build_from_state(read_checkpoint(path), path)
    model.version = PRETRAINED_NAME if checkpoint is None else "custom"
    return model


def block_names(backbone: nn.Module) -> tuple[list[str], list[list[str]]]:
    """(embedding module names, module names of each interaction block); the energy readout after
    the last block is left out. Raises ValueError for a layout other than embedding -> blocks."""
    prefix: list[str] = []
    blocks: list[list[str]] = []
    for name in backbone._modules:
        match = _BLOCK.match(name)
        if match is None:
            if blocks:
                break  # readout: not used
            prefix.append(name)
            continue
        idx = int(match.group(1))
        if idx == len(blocks):
            blocks.append([])
        elif idx != len(blocks) - 1:
            raise ValueError(f"SevenNet module {name!r} is out of order (blocks must be numbered 0, 1, ...)")
        blocks[idx].append(name)
    if not blocks:
        raise ValueError("SevenNet model has no interaction blocks ('0_...' modules)")
    gate = backbone._modules.get(f"{len(blocks) - 1}_equivariant_gate")
    if gate is None:
        raise ValueError(f"SevenNet model has no '{len(blocks) - 1}_equivariant_gate': unknown layout")
    return prefix, blocks


def scalar_channels(backbone: nn.Module) -> Tensor:
    """Indices of the 0e channels of the last block's output (the invariant node features)."""
    _, blocks = block_names(backbone)
    irreps = backbone._modules[f"{len(blocks) - 1}_equivariant_gate"].gate.irreps_out
    index = [i for (_, ir), sl in zip(irreps, irreps.slices()) if ir.l == 0 and ir.p == 1 for i in range(sl.start, sl.stop)]
    if not index:
        raise ValueError(f"SevenNet's final node irreps {irreps} have no 0e channels to pool")
    return torch.tensor(index, dtype=torch.long)


# ----------------------------------------------------------------------------- graphs


@dataclass
class SevenNetGraph:
    """One crystal as SevenNet sees it: atoms and the directed edges within the cutoff."""

    atomic_numbers: Tensor  # [n_atoms] long
    edge_index: Tensor  # [2, n_edges] long, (destination, source) as sevenn builds it
    edge_vec: Tensor  # [n_edges, 3] Å
    graph_id: str | None = None

    @property
    def rows(self) -> int:
        """Feature rows message passing processes: atoms + edges."""
        return int(self.atomic_numbers.shape[0] + self.edge_index.shape[1])


def structure_to_graph(backbone: nn.Module, structure, graph_id: str | None = None) -> SevenNetGraph:
    """pymatgen Structure -> SevenNetGraph with the backbone's cutoff (sevenn's neighbour list)."""
    from pymatgen.io.ase import AseAtomsAdaptor
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    known = backbone.type_map
    numbers = [int(z) for z in structure.atomic_numbers]
    missing = [i for i, z in enumerate(numbers) if z not in known]
    if missing:
        raise ValueError(
            f"site {missing[0]} is {structure[missing[0]].specie}: the SevenNet checkpoint has no embedding for it "
            f"({len(known)} elements known; {len(missing)} such sites)"
        )
    data = unlabeled_atoms_to_graph(AseAtomsAdaptor.get_atoms(structure), float(backbone.cutoff))
    return SevenNetGraph(
        atomic_numbers=torch.tensor(numbers, dtype=torch.long),
        edge_index=torch.as_tensor(data["edge_index"], dtype=torch.long).reshape(2, -1),
        edge_vec=torch.as_tensor(data["edge_vec"], dtype=torch.float32).reshape(-1, 3),
        graph_id=graph_id,
    )


# ----------------------------------------------------------------------------- forward


@dataclass
class State:
    """Node and edge tensors of a batch entering a block (possibly tiled over samples)."""

    data: dict[str, Tensor]
    owners: Tensor  # [n_atoms] group index
    n_groups: int

    def tile(self, times: int) -> State:
        if times == 1:
            return self
        n_atoms = self.owners.shape[0]
        data = {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in self.data.items() if k != "edge_index"}
        index = self.data["edge_index"]
        offs = n_atoms * torch.arange(times, dtype=index.dtype, device=index.device)
        data["edge_index"] = (index.unsqueeze(0) + offs[:, None, None]).transpose(0, 1).reshape(2, -1)
        owners = (self.owners.unsqueeze(0) + self.n_groups * torch.arange(times, device=self.owners.device)[:, None]).reshape(-1)
        return State(data, owners, self.n_groups * times)

    def counts(self) -> list[int]:
        return torch.bincount(self.owners, minlength=self.n_groups).tolist()


def _embed(backbone: nn.Module, graphs: Sequence[SevenNetGraph]) -> State:
    """Edge embedding and one-hot node embedding of a batch: the state entering block 0."""
    prefix, _ = block_names(backbone)
    n_atoms = [int(g.atomic_numbers.shape[0]) for g in graphs]
    offsets = torch.tensor([0] + n_atoms[:-1], dtype=torch.long).cumsum(0)
    z = torch.cat([g.atomic_numbers for g in graphs])
    owners = torch.repeat_interleave(torch.arange(len(graphs)), torch.tensor(n_atoms, dtype=torch.long))
    data = {
        "x": backbone.z_to_onehot_tensor[z],
        "edge_index": torch.cat([g.edge_index + off for g, off in zip(graphs, offsets.tolist())], dim=1),
        "edge_vec": torch.cat([g.edge_vec for g in graphs]),
        "batch": owners,
    }
    for name in prefix:
        data = backbone._modules[name](data)
    keep = {k: data[k] for k in (*_NODE_KEYS, *_EDGE_KEYS, "edge_index") if k in data}
    return State(keep, owners, len(graphs))


@dataclass
class SevenNetPrefix:
    """One crystal's tensors entering interaction block ``block`` (edge_index local to the crystal)."""

    block: int
    data: dict[str, Tensor]  # x [n_atoms, irreps], node_attr, edge_embedding, edge_attr [n_edges, ...], edge_index [2, n_edges]
    graph_id: str | None = None

    @property
    def rows(self) -> int:
        return int(self.data["x"].shape[0] + self.data["edge_index"].shape[1])


def _split(state: State, graphs: Sequence, block: int) -> list[SevenNetPrefix]:
    """One SevenNetPrefix per crystal of ``state`` (edge indices made local to the crystal)."""
    out: list[SevenNetPrefix] = []
    counts = state.counts()
    edge_owner = state.owners[state.data["edge_index"][0]]
    atom0 = 0
    for c, graph in enumerate(graphs):
        edges = edge_owner == c
        data = {k: v[edges].clone() if k in _EDGE_KEYS else v[atom0 : atom0 + counts[c]].clone() for k, v in state.data.items() if k != "edge_index"}
        data["edge_index"] = state.data["edge_index"][:, edges] - atom0
        out.append(SevenNetPrefix(block, data, getattr(graph, "graph_id", None)))
        atom0 += counts[c]
    return out


def _collate(items: Sequence[SevenNetPrefix]) -> State:
    """Batch prefixes into the state the remaining blocks take (edge indices shifted per crystal)."""
    n_atoms = [p.data["x"].shape[0] for p in items]
    offsets = torch.tensor([0] + n_atoms[:-1], dtype=torch.long).cumsum(0).tolist()
    data = {k: torch.cat([p.data[k] for p in items]) for k in items[0].data if k != "edge_index"}
    data["edge_index"] = torch.cat([p.data["edge_index"] + off for p, off in zip(items, offsets)], dim=1)
    owners = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(n_atoms, dtype=torch.long))
    return State(data, owners, len(items))


class SevenNetBackbone(Backbone):
    """SevenNet (``sevenn`` package, an optional extra): equivariant node features; adapters on e3nn ``o3.Linear``."""

    name = "sevennet"
    default_targets = DEFAULT_TARGETS
    prefix_type = SevenNetPrefix

    load = staticmethod(load_sevennet)
    package_version = staticmethod(sevenn_version)

    def limits(self, net: nn.Module) -> GraphLimits:
        """The checkpoint's cutoff and element set (SevenNet builds no angles)."""
        known = frozenset(int(z) for z in net.type_map)
        return GraphLimits(cutoff=float(net.cutoff), bond_cutoff=None, max_atomic_number=max(known), elements=known)

    def structure_to_graph(self, net: nn.Module, structure, graph_id: str | None = None) -> SevenNetGraph:
        return structure_to_graph(net, structure, graph_id)

    def wrappers(self) -> dict:
        from e3nn.o3 import Linear

        return {Linear: IrrepsLoRA}

    def feature_dim(self, net: nn.Module) -> int:
        return int(scalar_channels(net).numel())

    def n_blocks(self, net: nn.Module) -> int:
        return len(block_names(net)[1])

    def block_modules(self, net: nn.Module, idx: int) -> list[nn.Module]:
        return [net._modules[name] for name in block_names(net)[1][idx]]

    def embedding_modules(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, net._modules[name]) for name in block_names(net)[0]]

    def embed(self, net: nn.Module, graphs: Sequence[SevenNetGraph]) -> State:
        return _embed(net, graphs)

    def run_block(self, net: nn.Module, state: State, idx: int) -> State:
        data = dict(state.data)
        for name in block_names(net)[1][idx]:
            data = net._modules[name](data)
        return State({k: data[k] for k in state.data}, state.owners, state.n_groups)

    def row_layout(self, net: nn.Module, state: State, tiled: State) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """Owners and per-crystal segments of every node-row layout the adapters use (``node_{2l+1}``:
        each atom contributes 2l+1 rows, atom-major)."""
        counts, dims = state.counts(), adapted_dims(net)
        return {f"node_{d}": tiled.owners.repeat_interleave(d) for d in dims}, {f"node_{d}": [c * d for c in counts] for d in dims}

    def readout(self, net: nn.Module, state: State) -> tuple[Tensor, Tensor, int]:
        x = state.data["x"].index_select(1, scalar_channels(net).to(state.data["x"].device))
        return x, state.owners, state.n_groups

    def split_prefixes(self, net: nn.Module, state: State, graphs: Sequence, block: int) -> list[SevenNetPrefix]:
        return _split(state, graphs, block)

    def collate(self, net: nn.Module, items: Sequence[SevenNetPrefix]) -> State:
        return _collate(items)


#: The family, registered in :mod:`matbalora.backbones` (``FAMILY.compute_prefixes(net, graphs, block)`` etc.).
FAMILY = SevenNetBackbone()
