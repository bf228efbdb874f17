"""BandGapModel: a pretrained backbone, optional LoRA/BaLoRA adapters, and a band-gap head."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from matbalora.adapters import (
    BaLoRALinear,
    adapters_of,
    mark_only_adapters_trainable,
    noise_bank,
    total_kl,
)
from matbalora.backbones import DEFAULT_BACKBONE, get_backbone
from matbalora.backbones.base import Backbone
from matbalora.config import AdapterConfig, HeadConfig, Method
from matbalora.noise_context import NoiseContext
from matbalora.data.crystal_key import draw_seed
from matbalora.head import BandGapHead


#: Default budget of feature rows (atoms + directed bonds + angles, times draws) per forward pass.
#: ~0.6 GB of activations on CPU: see ``benchmarks/speed.py`` for the measured peak memory.
DEFAULT_MAX_ROWS = 200_000


@dataclass(frozen=True)
class Pass:
    """One forward pass of a prediction: crystals ``start:stop`` with ``draws`` samples each."""

    start: int
    stop: int
    draws: int


def plan_passes(rows: Sequence[int], *, draws: int, max_rows: int, max_crystals: int) -> list[Pass]:
    """Split crystals (in order) into forward passes whose tiled row count stays within a budget.

    ``rows[i]``: feature rows of crystal i (``graph_rows``); a pass holds consecutive crystals while
    ``sum(rows) * draws <= max_rows`` and at most ``max_crystals`` of them. A crystal that exceeds the
    budget on its own gets passes of its own, each with as many draws as fit (at least one): memory is
    bounded by the largest crystal's single draw, whatever the number of samples.
    """
    if draws < 1 or max_rows < 1 or max_crystals < 1:
        raise ValueError(f"draws={draws}, max_rows={max_rows}, max_crystals={max_crystals}: each must be >= 1")
    passes: list[Pass] = []
    start, total = 0, 0
    for i, n in enumerate(rows):
        if n * draws > max_rows:  # too large for one pass with every draw: split its draws
            if i > start:
                passes.append(Pass(start, i, draws))
            per_pass = max(1, max_rows // max(n, 1))
            passes.extend(Pass(i, i + 1, min(per_pass, draws - done)) for done in range(0, draws, per_pass))
            start, total = i + 1, 0
            continue
        if i > start and ((total + n) * draws > max_rows or i - start >= max_crystals):
            passes.append(Pass(start, i, draws))
            start, total = i, 0
        total += n
    if start < len(rows):
        passes.append(Pass(start, len(rows), draws))
    return passes


@dataclass
class GapSamples:
    """Raw Monte-Carlo output for a batch: ``gaps`` [S, n] eV (S: draws, times the head's gap members
    when it has several: ``members`` blocks of draws, member-major); ``aleatoric_var`` [n] eV^2 or None."""

    gaps: np.ndarray
    aleatoric_var: np.ndarray | None
    members: int = 1

    def by_member(self) -> np.ndarray:
        """[members, draws, n]: the gaps of each gap member apart."""
        return self.gaps.reshape(self.members, -1, self.gaps.shape[-1])

    def draws(self, start: int, stop: int) -> np.ndarray:
        """[members * (stop - start), n]: draws ``start`` … ``stop - 1`` of every gap member (the first
        S draws of a model with five gap heads are 5 S gaps)."""
        return self.by_member()[:, start:stop].reshape(-1, self.gaps.shape[-1])


class BandGapModel(nn.Module):
    """Backbone + adapters + head. ``method`` decides what is trainable:

    head: only the head; lora / balora: adapters + head; full: everything except the frozen
    normalisation statistics. The backbone always runs in eval mode (BatchNorm statistics never
    drift); BaLoRA noise is switched by ``self.context``, independently of train()/eval().
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        method: Method,
        adapter: AdapterConfig | None,
        head: HeadConfig,
        backbone_checkpoint: str | None = None,
        backbone_name: str = DEFAULT_BACKBONE,
    ) -> None:
        super().__init__()
        family = get_backbone(backbone_name)
        if method in ("lora", "balora") and adapter is None:
            raise ValueError(f"method={method!r} needs an AdapterConfig")
        if method in ("head", "full") and adapter is not None:
            raise ValueError(f"method={method!r} takes no adapters; got {adapter}")
        if adapter is not None and adapter.bayesian != (method == "balora"):
            raise ValueError(f"adapter.bayesian={adapter.bayesian} contradicts method={method!r}")
        self.method = method
        self.adapter_config = adapter
        self.head_config = head
        self.backbone_checkpoint = backbone_checkpoint
        self.backbone_name = backbone_name
        self.backbone_version = family.backbone_version(backbone)
        self.context = NoiseContext()
        #: MC dropout switches module state: those models (none shipped) sample one call at a time
        self._dropout_lock = threading.Lock()
        self.backbone = backbone
        if adapter is not None:
            family.inject(backbone, adapter, self.context)
        self.compute_dtype = torch.float32  # of the adapted blocks; see compute_in
        pooled_dim = family.feature_dim(backbone) * (2 if head.pooling == "mean_max" else 1)
        self.head = BandGapHead(pooled_dim, head)
        self._mark_trainable()
        self.train(False)

    @classmethod
    def from_pretrained(
        cls,
        method: Method = "balora",
        *,
        adapter: AdapterConfig | None = None,
        head: HeadConfig | None = None,
        checkpoint: str | os.PathLike | None = None,
        backbone: str = DEFAULT_BACKBONE,
    ) -> BandGapModel:
        """Wrap a pretrained backbone of a family in ``BACKBONES`` (e.g. ``chgnet``: the wheel's 0.3.0,
        ``sevennet``: SevenNet-0 from the sevenn wheel), or that family's checkpoint file."""
        family = get_backbone(backbone)
        if adapter is None and method in ("lora", "balora"):
            adapter = AdapterConfig(bayesian=method == "balora", targets=family.default_targets)
        net = family.load(checkpoint)
        ckpt = None if checkpoint is None else os.fspath(checkpoint)
        return cls(net, method=method, adapter=adapter, head=head or HeadConfig(), backbone_checkpoint=ckpt, backbone_name=backbone)

    # ----------------------------------------------------------------------------- training state

    def _mark_trainable(self) -> None:
        if self.method == "full":
            for p in self.backbone.parameters():
                p.requires_grad_(True)
        else:
            mark_only_adapters_trainable(self.backbone)
        for sub in self.family.frozen_modules(self.backbone, self.method):  # e.g. an unused energy readout
            for p in sub.parameters():
                p.requires_grad_(False)
        for p in self.head.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> BandGapModel:
        super().train(mode)
        self.backbone.eval()  # frozen norm statistics, always
        for m in adapters_of(self.backbone):  # adapter dropout (MC dropout) follows train()
            m.dropout.train(mode)
        return self

    def set_dropout(self, active: bool) -> None:
        """Switch adapter and head dropout on (MC dropout at test time) or off."""
        for m in list(adapters_of(self.backbone)) + [self.head]:
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.train(active)

    @property
    def family(self) -> Backbone:
        """This model's backbone family (``matbalora.backbones.BACKBONES``)."""
        return get_backbone(self.backbone_name)

    @property
    def is_bayesian(self) -> bool:
        return any(isinstance(m, BaLoRALinear) for m in self.backbone.modules())

    @property
    def draws_follow_keys(self) -> bool:
        """Whether ``sample_gaps(keys=...)`` makes a crystal's draws depend on its key only: BaLoRA with
        per-crystal noise and no dropout (per-row noise and MC dropout draw from a shared stream)."""
        return self.is_bayesian and not self.has_dropout and all(m.noise == "per_crystal" for m in self.backbone.modules() if isinstance(m, BaLoRALinear))

    @property
    def has_dropout(self) -> bool:
        return (self.adapter_config is not None and self.adapter_config.dropout > 0) or self.head_config.dropout > 0

    def kl(self) -> Tensor:
        """Total KL of the BaLoRA posterior to its prior (0 when there are no BaLoRA layers)."""
        return total_kl(self.backbone)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}

    # ----------------------------------------------------------------------------- forward

    def forward(self, graphs: Sequence, *, samples: int = 1) -> dict[str, Tensor]:
        """graphs: the backbone's graphs (CHGNet CrystalGraphs, SevenNetGraphs, or cached prefixes)
        -> head outputs, each [samples, n_crystals]."""
        feats = self.family.crystal_features(self.backbone, graphs, samples=samples, context=self.context,
                                             pooling=self.head_config.pooling, dtype=self.compute_dtype)
        return self.head(feats)

    @contextmanager
    def compute_in(self, dtype: torch.dtype) -> Iterator[None]:
        """Run the adapted blocks in ``dtype`` inside the block (training steps on cached frozen features).

        The frozen weights of those blocks are cast for the duration and restored bit for bit on
        exit; adapter and head weights stay float32 (the adapters cast themselves to the input's
        dtype), so the optimiser updates float32 weights. ``bfloat16`` halves the memory traffic of
        the message tensors and uses the CPU's bf16 matrix units; the adapters fold their update
        into the weight (one [d_out, d_in] matrix per layer, or per crystal for BaLoRA draws), which
        is the same function with fewer, larger matrix products.
        """
        if dtype == torch.float32:
            yield
            return
        if not self.family.low_precision:
            raise ValueError(f"compute dtype {dtype} is not supported for backbone {self.backbone_name!r}")
        saved: list[tuple[Tensor, Tensor]] = []
        for module in self.family.adapted_blocks(self.backbone):
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point() and not t.requires_grad and t.dtype != dtype:
                    saved.append((t, t.data))
                    t.data = t.data.to(dtype)
        adapters = adapters_of(self.backbone)
        for m in adapters:
            m.fold_in_training = True
        self.compute_dtype = dtype
        try:
            yield
        finally:
            self.compute_dtype = torch.float32
            for m in adapters:
                m.fold_in_training = False
            for t, original in saved:
                t.data = original

    @torch.no_grad()
    def pooled_features(self, graphs: Sequence, *, batch: int = 64) -> Tensor:
        """The head's input for ``graphs`` [n, feature_dim], deterministic (posterior mean, no dropout), in batches."""
        was_training = self.training
        self.train(False)
        try:
            with self.context.sampling("mean"):
                return torch.cat([self.family.crystal_features(self.backbone, graphs[i : i + batch], samples=1, context=self.context,
                                                               pooling=self.head_config.pooling)[0]
                                  for i in range(0, len(graphs), batch)])
        finally:
            self.train(was_training)

    def structure_to_graph(self, structure, graph_id: str | None = None):
        """pymatgen Structure -> the backbone's graph (its own converter and cutoff)."""
        return self.family.structure_to_graph(self.backbone, structure, graph_id=graph_id)

    @torch.no_grad()
    def sample_gaps(
        self,
        graphs: Sequence,
        *,
        samples: int = 16,
        seed: int | None = 0,
        batch_size: int = 64,
        max_rows: int = DEFAULT_MAX_ROWS,
        keys: Sequence[str] | None = None,
    ) -> GapSamples:
        """Monte-Carlo band gaps for ``graphs``.

        samples=0: one deterministic pass (BaLoRA posterior mean; dropout off) -> gaps [1, n].
        samples>0 on a BaLoRA model: ``samples`` adapter draws per crystal -> gaps [samples, n];
        on a model with dropout, MC dropout; on any other model the pass is deterministic -> [1, n].
        Passes hold at most ``batch_size`` crystals and ``max_rows`` feature rows counted over all
        draws (see :func:`plan_passes`), so memory is bounded by atoms and bonds, not crystals.
        With ``keys`` (one per graph, e.g. :func:`~matbalora.data.crystal_key.crystal_key`), the BaLoRA
        draws of a crystal depend only on its key and the seed: the same in any batch and any order
        (when :attr:`draws_follow_keys`; other models ignore the keys). Without keys, or for those
        models, they depend on the seed and on how the crystals fall into passes.
        """
        if samples < 0:
            raise ValueError(f"samples={samples!r} must be >= 0")
        if keys is not None and len(keys) != len(graphs):
            raise ValueError(f"keys has {len(keys)} entries for {len(graphs)} graphs")
        stochastic = samples > 0 and (self.is_bayesian or self.has_dropout)
        n_draws = samples if stochastic else 1
        mode = "sample" if stochastic and self.is_bayesian else "mean"
        rows = [self.family.graph_rows(g) for g in graphs]
        passes = plan_passes(rows, draws=n_draws, max_rows=max_rows, max_crystals=batch_size)
        # MC dropout switches module state and uses torch's global generator: one call at a time
        with self._dropout_lock if self.has_dropout else contextlib.nullcontext():
            self.eval()
            if stochastic and self.has_dropout and seed is not None:
                torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            outputs = self._sample_passes(graphs, passes, mode=mode, gen=gen, keys=keys if self.draws_follow_keys else None,
                                          seed=seed, stochastic=stochastic)
        if not outputs:
            return GapSamples(np.zeros((n_draws, 0)), None)

        def stack(key: str) -> Tensor:  # [draws, n_crystals] ([members, draws, n_crystals] for gap_members)
            return torch.cat([torch.cat([o[key] for o in outs], dim=-2) for outs in outputs.values()], dim=-1)

        first = next(iter(outputs.values()))[0]
        alea = stack("log_var").double().exp().mean(0).numpy() if "log_var" in first else None
        # a head ensemble: each draw of each gap member is one sample of the predictive distribution
        members = stack("gap_members") if "gap_members" in first else stack("gap")[None]
        return GapSamples(members.flatten(0, 1).double().numpy(), alea, members=members.shape[0])

    def _sample_passes(self, graphs, passes, *, mode, gen, keys, seed, stochastic) -> dict[tuple[int, int], list[dict[str, Tensor]]]:
        outputs: dict[tuple[int, int], list[dict[str, Tensor]]] = {}  # crystals -> their passes, draws in order
        keyed = mode == "sample" and keys is not None
        key_seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.set_dropout(stochastic and self.has_dropout)
        try:
            with self.context.sampling(mode, generator=gen):
                for step in passes:
                    first = sum(o["gap"].shape[0] for o in outputs.get((step.start, step.stop), []))  # draws done for these crystals
                    bank = {}
                    if keyed:
                        bank = noise_bank(self.backbone, [[draw_seed(k, key_seed, first + s) for k in keys[step.start : step.stop]] for s in range(step.draws)])
                    with self.context.drawn(bank):
                        out = self(graphs[step.start : step.stop], samples=step.draws)
                    outputs.setdefault((step.start, step.stop), []).append(out)
        finally:
            self.set_dropout(False)
        return outputs
