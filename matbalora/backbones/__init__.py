"""Backbone families behind one interface (:class:`~matbalora.backbones.base.Backbone`), by name.

:data:`BACKBONES` is the registry that the model, the CLI's ``--backbone`` choices and the model
folder loader read. A family is one module defining ``FAMILY`` (a ``Backbone``) plus one line here.
Importing this package imports no family (nor torch): :func:`get_backbone` imports the one asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matbalora.backbones.base import Backbone

#: name -> the module whose ``FAMILY`` implements it; the first is the default
BACKBONES: dict[str, str] = {
    "chgnet": "matbalora.backbones.chgnet",
    "sevennet": "matbalora.backbones.sevennet",
}
DEFAULT_BACKBONE = next(iter(BACKBONES))


def get_backbone(name: str) -> Backbone:
    """The family registered as ``name``; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not known; choose one of {list(BACKBONES)}")
    return importlib.import_module(BACKBONES[name]).FAMILY


__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "get_backbone"]
