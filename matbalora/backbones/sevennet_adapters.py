"""LoRA / BaLoRA on e3nn ``o3.Linear`` layers without breaking equivariance.

An ``o3.Linear`` is a sum of independent paths, one per instruction ``mul_in x ir -> mul_out x ir``
(same irrep on both sides): ``y[ir, m] += w_path * W^T x[ir, m]`` for every component m of the irrep.
A rotation mixes the m components and never the channels, so any update that acts on channels
alone, identically for every m, keeps the layer equivariant. :class:`IrrepsLoRA` therefore gives
each path its own adapter (a :class:`~matbalora.adapters.LoRALinear` or ``BaLoRALinear`` around a
frozen ``nn.Linear(mul_in, mul_out)`` holding that path's block) and feeds it the rows
``(atom, m)`` of the path's input, atom-major: for ``l = 0`` one row per atom, for ``l = 1`` three.
The rest of the layer (paths without an adapter, biases) keeps running through e3nn.

BaLoRA noise must be the same for every m of an atom, or the draw itself would break symmetry:
with ``noise="per_crystal"`` one draw of A serves every row of a crystal (row kind ``node_{2l+1}``),
which is exactly that. ``noise="per_row"`` (independent noise per row, i.e. per m component) and
adapter dropout (which zeroes single m components) are refused on ``l > 0`` paths.

The wrapper is injected by the one injector, :func:`matbalora.adapters.inject_adapters`, with
``wrappers={o3.Linear: IrrepsLoRA}`` (``SevenNetBackbone.wrappers``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matbalora.adapters import BaLoRALinear, LoRALinear
from matbalora.noise_context import NoiseContext
from matbalora.config import AdapterConfig


class IrrepsLoRA(nn.Module):
    """A frozen e3nn ``o3.Linear`` plus one low-rank adapter per path (``adapters[k]`` for
    instruction k). Input and output: [n_rows, irreps.dim], as the wrapped layer."""

    def __init__(self, base: nn.Module, config: AdapterConfig, context: NoiseContext | None) -> None:
        super().__init__()
        if not getattr(base, "internal_weights", False) or not getattr(base, "shared_weights", False):
            raise TypeError(f"IrrepsLoRA wraps an o3.Linear with internal, shared weights; got {type(base).__name__}")
        if config.bayesian and context is None:
            raise ValueError("BaLoRA adapters need a NoiseContext")
        self.base = base
        mask = torch.ones_like(base.weight)
        in_slices, out_slices = base.irreps_in.slices(), base.irreps_out.slices()
        self.layout: list[tuple[slice, slice, int, int, int]] = []  # (in, out, mul_in, mul_out, 2l+1)
        adapters = []
        for k, ins in enumerate(base.instructions):
            mul_in, ir = base.irreps_in[ins.i_in]
            mul_out, _ = base.irreps_out[ins.i_out]
            if ir.l > 0 and config.noise == "per_row" and config.bayesian:
                raise ValueError(
                    f"noise='per_row' draws independent noise for each component of the {ir} features and breaks "
                    "rotation equivariance; use noise='per_crystal' for SevenNet adapters"
                )
            if ir.l > 0 and config.dropout > 0:
                raise ValueError(f"adapter dropout={config.dropout} zeroes single components of the {ir} features and breaks equivariance; use 0")
            block = base.weight_view_for_instruction(k).detach()  # [mul_in, mul_out]
            frozen = nn.Linear(mul_in, mul_out, bias=False)
            with torch.no_grad():
                frozen.weight.copy_(ins.path_weight * block.T)
            frozen.weight.requires_grad_(False)
            adapter = BaLoRALinear(frozen, config, context) if config.bayesian else LoRALinear(frozen, config)
            adapter.row_kind = f"node_{ir.dim}"
            adapters.append(adapter.to(dtype=base.weight.dtype, device=base.weight.device))
            base.weight_view_for_instruction(k, mask).zero_()
            self.layout.append((in_slices[ins.i_in], out_slices[ins.i_out], mul_in, mul_out, ir.dim))
        self.adapters = nn.ModuleList(adapters)
        self.register_buffer("mask", mask, persistent=False)  # the e3nn part skips the adapted paths

    @property
    def irreps_in(self):
        return self.base.irreps_in

    @property
    def irreps_out(self):
        return self.base.irreps_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x, self.base.weight * self.mask)
        n = x.shape[0]
        for (sl_in, sl_out, mul_in, mul_out, dim), adapter in zip(self.layout, self.adapters):
            rows = x[:, sl_in].reshape(n, mul_in, dim).transpose(1, 2).reshape(n * dim, mul_in)
            out = adapter(rows).reshape(n, dim, mul_out).transpose(1, 2).reshape(n, mul_out * dim)
            y = torch.cat([y[:, : sl_out.start], y[:, sl_out] + out, y[:, sl_out.stop :]], dim=1)
        return y


def adapted_dims(model: nn.Module) -> set[int]:
    """Row multiplicities (2l+1) of the adapted paths in ``model``."""
    return {dim for m in model.modules() if isinstance(m, IrrepsLoRA) for *_, dim in m.layout}
