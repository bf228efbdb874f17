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
