"""Backbone families (``chgnet``, ``sevennet``), each a module with the same interface; see
:func:`matbalora.model.backbone_family`."""

from __future__ import annotations

from collections.abc import Sequence


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


def pool_atoms(x, owners, n_groups: int, how: str = "mean"):
    """Per-crystal pooling of atom features  x [n_atoms, d] -> [n_groups, d] (``mean``) or
    [n_groups, 2 d] (``mean_max``: mean and element-wise max, concatenated). ``owners`` [n_atoms]."""
    import torch

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
