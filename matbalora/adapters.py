"""LoRA and BaLoRA adapters that wrap ``nn.Linear`` layers (pure torch, backbone-agnostic).

``LoRALinear``:   y = W0 x + b0 + s * B (A x)
``BaLoRALinear``: A ~ q(A_kj) = N(M_kj, a_k M_kj^2), y = W0 x + b0 + s * B h,  h = A x
(see ``shared/design/BALORA.md``). B starts at zero, so a freshly wrapped model equals the
pretrained one.

Sampling is controlled by a :class:`~matbalora.noise_context.NoiseContext` shared by all BaLoRA layers of a model, not by
``train()``/``eval()``:

* ``mode="mean"``: A = M (posterior mean, deterministic);
* ``mode="sample"`` with ``noise="per_crystal"``: one draw of A per *group* (crystal x sample), shared
  by every row of that group; the backbone sets ``ctx.owners[row_kind]`` (row -> group index) before
  the forward. Without owners every row is its own group. When the backbone also sets
  ``ctx.segments[row_kind]`` (rows per crystal in one tile) and ``ctx.tiles`` (S), the rows are
  known to be tile-major (row ``s * N + i`` of crystal c belongs to group ``s * C + c``) and the
  draw runs as one batched matmul over the S samples per crystal instead of one matmul per group;
* ``mode="sample"`` with ``noise="per_row"``: independent Gaussian h per row (local reparameterisation).

Without autograd (``torch.no_grad()``, i.e. prediction) and without active adapter dropout, a layer
computes the same function with the update folded into the weight: ``(W0 + s B A) x + b0``, with
``A = M`` for the mean and one sampled ``A`` per group for per-crystal draws (a [out, in] matrix
per crystal and sample, applied by a batched matmul). That costs one frozen-layer matmul instead of
three, so the deterministic pass runs at the backbone's own speed. Training forwards (autograd on)
always work in activation space and never build ``B A``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from matbalora.config import AdapterConfig
from matbalora.noise_context import NoiseContext

# Molchanov et al. (2017) approximation of -KL(q || log-uniform prior) for multiplicative noise.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695

def neg_kl_log_uniform(log_a: Tensor) -> Tensor:
    """-KL(N(M, a M^2) || log-uniform) per weight entry, as a function of log a (same shape)."""
    return _K1 * torch.sigmoid(_K2 + _K3 * log_a) - 0.5 * torch.nn.functional.softplus(-log_a) - _K1


class LoRALinear(nn.Module):
    """Frozen ``base`` linear plus a trainable low-rank update ``s * B A``."""

    def __init__(self, base: nn.Linear, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.rank, self.scale = config.rank, config.scale
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.row_kind: str | None = None  # set by the backbone: which rows this layer sees
        #: fold the update into the weight in training forwards too (set by ``BandGapModel.compute_in``)
        self.fold_in_training = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def low_rank(self, x: Tensor) -> Tensor:
        """h = A x  [n_rows, r]."""
        return x @ self.lora_A.T.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self.foldable():
            return nn.functional.linear(x, (self.base.weight + self.delta_weight()).to(x.dtype), self.base.bias)
        # the adapter's weights stay float32; they compute in the dtype of the input (see BandGapModel.compute_in)
        return self.base(x) + self.scale * (self.low_rank(self.dropout(x)) @ self.lora_B.T.to(x.dtype))

    def foldable(self) -> bool:
        """True when the update may be folded into the weight: no active dropout, and no autograd
        unless ``fold_in_training`` (small layers: one fat matmul and a weight gradient are cheaper
        than the three skinny rank-r products of activation space, measured in benchmarks/speed.py)."""
        no_dropout = isinstance(self.dropout, nn.Identity) or not self.dropout.training
        return no_dropout and (self.fold_in_training or not torch.is_grad_enabled())

    def delta_weight(self) -> Tensor:
        """s * B A, the update a merge adds to W0  [out, in]."""
        return self.scale * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("adapter is already merged")
        new = self.base.weight + self.delta_weight()
        if not torch.isfinite(new).all():
            raise ValueError("merge would put NaN/inf into the base weight; refusing")
        self.base.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.base.weight.sub_(self.delta_weight())
        self.merged = False


class BaLoRALinear(LoRALinear):
    """LoRA whose A is Gaussian with variance a_k M_kj^2 (one learned log a per rank component).

    ``lora_A`` holds the posterior mean M; ``log_a`` [r] the noise ratios.
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig, context: NoiseContext) -> None:
        super().__init__(base, config)
        self.log_a = nn.Parameter(torch.full((config.rank,), float(config.log_a_init)))
        self.log_a_range = (config.log_a_min, config.log_a_max)
        self.noise = config.noise
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        if self.merged and self.context.mode == "sample":
            raise RuntimeError(
                "a merged BaLoRA layer is its posterior mean and gives no uncertainty; unmerge to sample"
            )
        segments = self.context.segments.get(self.row_kind) if self.row_kind else None
        if self.context.mode == "sample" and self.noise == "per_crystal" and segments is not None and LoRALinear.foldable(self):
            return self._folded_draws(x, segments)
        return super().forward(x)

    def foldable(self) -> bool:
        """Folding ``B M`` into the weight is the posterior mean: right only when not sampling
        (sampled draws fold per crystal in :meth:`_folded_draws`, or run in activation space)."""
        return super().foldable() and self.context.mode == "mean"

    def _draw_noise(self, n_groups: int, std_ratio: Tensor, gen: torch.Generator | None, like: Tensor) -> Tensor:
        """Noise of A for ``n_groups`` independent draws  [G, r, d_in]: A_g = M + noise_g."""
        eps = self.context.bank.get(self)
        if eps is None:
            eps = torch.randn((n_groups, *self.lora_A.shape), generator=gen, dtype=self.lora_A.dtype, device=like.device)
        elif eps.shape[0] != n_groups:
            raise RuntimeError(f"the noise bank holds {eps.shape[0]} draws, the forward needs {n_groups}")
        return (self.lora_A * std_ratio[:, None]).unsqueeze(0) * eps

    def _folded_draws(self, x: Tensor, segments: list[int]) -> Tensor:
        """Per-crystal draws with the update folded into one weight per group.

        x [S * N, d_in] tile-major (see ``NoiseContext``) -> [S * N, d_out]; the same random numbers
        as the activation-space path, so both give the same draws up to float rounding.
        """
        tiles, n_crystals = self.context.tiles, len(segments)
        if x.shape[0] != tiles * sum(segments):
            raise RuntimeError(
                f"segments for row kind {self.row_kind!r} cover {tiles} x {sum(segments)} rows, input has {x.shape[0]}"
            )
        noise = self._draw_noise(tiles * n_crystals, self.clamped_log_a().exp().sqrt(), self.context.generator, x)
        weights = self.base.weight + torch.matmul(self.scale * self.lora_B, self.lora_A + noise)  # [S * C, out, in]
        out = grouped_matmul(x, segments * tiles, weights.transpose(1, 2))
        return out if self.base.bias is None else out + self.base.bias.to(x.dtype)

    def clamped_log_a(self) -> Tensor:
        return self.log_a.clamp(*self.log_a_range)

    def low_rank(self, x: Tensor) -> Tensor:
        if self.context.mode == "mean":
            return x @ self.lora_A.T.to(x.dtype)
        a = self.clamped_log_a().exp()
        gen = self.context.generator
        if self.noise == "per_row":
            mean = x @ self.lora_A.T.to(x.dtype)
            var = ((x * x) @ (self.lora_A * self.lora_A).T.to(x.dtype)) * a
            eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32, device=mean.device).to(mean.dtype)
            return mean + var.clamp_min(1e-20).sqrt() * eps  # not 0: sqrt'(0) = inf gave NaN gradients
        segments = self.context.segments.get(self.row_kind) if self.row_kind else None
        if segments is not None:  # one matmul per crystal with its sampled A (no separate mean pass)
            tiles, n_crystals = self.context.tiles, len(segments)
            if x.shape[0] != tiles * sum(segments):
                raise RuntimeError(
                    f"segments for row kind {self.row_kind!r} cover {tiles} x {sum(segments)} rows, input has {x.shape[0]}"
                )
            sampled = self.lora_A + self._draw_noise(tiles * n_crystals, a.sqrt(), gen, x)  # [S * C, r, d_in]
            return _tiled_segment_matmul(x, segments, sampled.view(tiles, n_crystals, *self.lora_A.shape).to(x.dtype))
        return x @ self.lora_A.T.to(x.dtype) + self._shared_draw_noise(x, a.sqrt(), gen)

    def _shared_draw_noise(self, x: Tensor, std_ratio: Tensor, gen: torch.Generator | None) -> Tensor:
        """Noise part of A x with one eps [r, d_in] per group, shared by all rows of the group."""
        owners = self.context.owners.get(self.row_kind) if self.row_kind else None
        if owners is None:
            owners = torch.arange(x.shape[0], device=x.device)
            n_groups = x.shape[0]
        else:
            if owners.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"owners for row kind {self.row_kind!r} have {owners.shape[0]} rows, input has {x.shape[0]}"
                )
            n_groups = self.context.n_groups or (int(owners.max()) + 1 if owners.numel() else 0)
        noisy_A = self._draw_noise(n_groups, std_ratio, gen, x).to(x.dtype)  # [G, r, d_in]
        if owners.numel() > 1 and not bool((owners[1:] >= owners[:-1]).all()):
            order = torch.argsort(owners, stable=True)
            out = torch.empty(x.shape[0], self.rank, dtype=x.dtype, device=x.device)
            out[order] = _segment_matmul(x[order], owners[order], noisy_A)
            return out
        return _segment_matmul(x, owners, noisy_A)

    def kl(self) -> Tensor:
        """KL(q(A) || prior) of this layer: d_in entries share each a_k."""
        return -neg_kl_log_uniform(self.clamped_log_a()).sum() * self.in_features

    @torch.no_grad()
    def merge(self) -> None:
        """Merge the posterior mean M into W0; the merged layer is deterministic (no uncertainty)."""
        super().merge()


def _tiled_segment_matmul(x: Tensor, counts: list[int], mats: Tensor) -> Tensor:
    """Tile-major rows: row ``s * N + i`` of crystal c gets ``mats[s, c] @ x_row``.

    x [S * N, d] with N = sum(counts); mats [S, C, r, d] -> [S * N, r]: the rows of (tile s, crystal c)
    are consecutive, so this is one grouped matmul over the S * C groups.
    """
    tiles, n_crystals, rank = mats.shape[:3]
    return grouped_matmul(x, counts * tiles, mats.reshape(tiles * n_crystals, rank, -1).transpose(1, 2))


def _segment_matmul(x: Tensor, sorted_owners: Tensor, mats: Tensor) -> Tensor:
    """Row i gets ``mats[owner_i] @ x_i``; rows sorted by owner.  x [n, d], mats [G, r, d] -> [n, r]."""
    counts = torch.bincount(sorted_owners, minlength=mats.shape[0]).tolist()
    return grouped_matmul(x, counts, mats.transpose(1, 2))


def grouped_matmul(x: Tensor, counts: list[int], mats: Tensor) -> Tensor:
    """Consecutive row blocks of x times their own matrix: block g (``counts[g]`` rows) @ ``mats[g]``.

    x [n, d] with n = sum(counts), mats [G, d, k] -> [n, k]. One grouped GEMM (``torch._grouped_mm``,
    forward and backward: 1.23x faster than one matmul per block for a bf16 BaLoRA bond layer's
    training step on 32 real crystals, ``benchmarks/speed.py --only layer``) where this torch has it
    and the shapes suit it (16-byte aligned rows); else one matmul per block, the same numbers.
    """
    mats = mats.to(x.dtype)
    if len(counts) != mats.shape[0] or sum(counts) != x.shape[0]:
        raise RuntimeError(f"{len(counts)} row blocks of {sum(counts)} rows for {mats.shape[0]} matrices and {x.shape[0]} rows")
    aligned = all(dim * x.element_size() % 16 == 0 for dim in (x.shape[1], mats.shape[2]))  # forward and backward need both
    if _GROUPED_MM is not None and x.shape[0] and aligned:
        try:
            out = _GROUPED_MM(x, mats, offs=torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32))
        except RuntimeError:  # alignment or dtype this build's kernel does not take: the loop below
            pass
        else:
            if out.requires_grad:  # its backward refuses strided gradients (e.g. the expanded one of a sum)
                out.register_hook(torch.Tensor.contiguous)
            return out
    pieces = [seg @ mat for mat, seg in zip(mats.unbind(0), torch.split(x, counts)) if seg.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, mats.shape[2])


_GROUPED_MM = getattr(torch, "_grouped_mm", None)


# ----------------------------------------------------------------------------- injection


def linear_adapter(base: nn.Linear, config: AdapterConfig, context: NoiseContext | None) -> LoRALinear:
    """The LoRA/BaLoRA wrapper of one ``nn.Linear``, on the base layer's device and dtype."""
    adapter = BaLoRALinear(base, config, context) if config.bayesian else LoRALinear(base, config)
    return adapter.to(device=base.weight.device, dtype=base.weight.dtype)


#: The wrapper of each layer type the injector adapts by default (families add theirs, e.g. e3nn's o3.Linear).
LINEAR_WRAPPERS: dict[type, Callable] = {nn.Linear: linear_adapter}


def adaptable_paths(model: nn.Module, layer_types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Module paths of every layer of ``layer_types`` (not already wrapped) in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, layer_types) and not n.endswith(".base")]


def select_targets(model: nn.Module, config: AdapterConfig, *, layer_types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Paths that ``inject_adapters`` would wrap (a dry run). Raises if nothing matches, naming the
    layers of ``layer_types`` that exist."""
    patterns = [re.compile(p) for p in config.targets]
    excludes = [re.compile(p) for p in config.exclude]
    available = adaptable_paths(model, layer_types)
    chosen = [
        p
        for p in available
        if any(r.fullmatch(p) for r in patterns) and not any(r.fullmatch(p) for r in excludes)
    ]
    if chosen and config.last_blocks:
        chosen = _in_last_blocks(chosen, config.last_blocks)
    if not chosen:
        noun = " or ".join("linear layer" if t is nn.Linear else f"{'.'.join(t.__module__.split('.')[:2])}.{t.__name__} layer" for t in layer_types)
        raise ValueError(
            f"adapter targets {list(config.targets)} (excluding {list(config.exclude)}) match no {noun}; "
            f"available {noun}s: {available}"
        )
    return chosen


def block_index(path: str) -> int | None:
    """The block a module path belongs to: its first component that is an integer
    (``atom_conv_layers.3.mlp_out`` -> 3) or starts with one and ``_`` (``3_self_interaction_1.linear`` -> 3)."""
    return next((int(m.group(1)) for part in path.split(".") if (m := re.fullmatch(r"(\d+)(?:_.*)?", part))), None)


def _in_last_blocks(paths: list[str], n: int) -> list[str]:
    """Paths whose block index is among the last ``n`` indices that occur in ``paths`` (paths without
    an index are not in a block and are kept)."""
    blocks = sorted({b for p in paths if (b := block_index(p)) is not None})
    keep = set(blocks[-n:]) | {None}
    return [p for p in paths if block_index(p) in keep]


def inject_adapters(
    model: nn.Module,
    config: AdapterConfig,
    context: NoiseContext | None = None,
    *,
    wrappers: Mapping[type, Callable] | None = None,
) -> dict[str, nn.Module]:
    """Replace each selected layer by its adapter in place; returns {path: adapter}.

    ``wrappers``: layer type -> ``wrap(base, config, context)`` (default: LoRA/BaLoRA on ``nn.Linear``);
    only layers of those types are candidates, and each is wrapped by the first type it is an instance of.
    """
    if config.bayesian and context is None:
        raise ValueError("BaLoRA adapters need a NoiseContext")
    wrappers = dict(wrappers or LINEAR_WRAPPERS)
    wrapped: dict[str, nn.Module] = {}
    for path in select_targets(model, config, layer_types=tuple(wrappers)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        wrap = next(w for t, w in wrappers.items() if isinstance(base, t))
        adapter = wrap(base, config, context)
        setattr(parent, child, adapter)
        wrapped[path] = adapter
    return wrapped


def noise_bank(model: nn.Module, seeds: Sequence[Sequence[int]]) -> dict[nn.Module, Tensor]:
    """Standard-normal noise for every BaLoRA layer of ``model``, one generator per (draw, crystal).

    ``seeds`` [S][C]: the seed of draw s of crystal c. Each generator fills all layers in module order,
    so a crystal's draws depend on its seeds only, not on the crystals it is batched with, nor on how its
    draws are split into passes. Returns layer -> eps [S * C, r, d_in], tile-major (row s * C + c)."""
    layers = [m for m in model.modules() if isinstance(m, BaLoRALinear)]
    if not layers:
        return {}
    sizes = [m.lora_A.numel() for m in layers]
    total = sum(sizes)
    eps = torch.stack([torch.randn(total, generator=torch.Generator().manual_seed(int(x))) for row in seeds for x in row])
    return {m: chunk.reshape(-1, *m.lora_A.shape) for m, chunk in zip(layers, eps.split(sizes, dim=1))}


def adapters_of(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def total_kl(model: nn.Module) -> Tensor:
    """Sum of KL over all BaLoRA layers (0 for LoRA / no adapters)."""
    terms = [m.kl() for m in model.modules() if isinstance(m, BaLoRALinear)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def adapter_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_" in n or n.endswith(".log_a")]


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze everything except adapter parameters (lora_A, lora_B, log_a)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapters_of(model):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
        if isinstance(m, BaLoRALinear):
            m.log_a.requires_grad_(True)


def merge_adapters(model: nn.Module) -> None:
    for m in adapters_of(model):
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in adapters_of(model):
        m.unmerge()
