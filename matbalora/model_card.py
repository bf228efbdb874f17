"""Checks on a model folder's ``config.json`` (its model card) before anything is built from it.

A card is someone else's file: it is read with a size and nesting bound, and every field that
sizes a tensor (adapter rank, head width and depth) or scales an interval (recalibration) must be
a finite number of the right type inside a range, so that an edited card is refused with the field
and the value instead of allocating gigabytes (``adapter.rank = 4e6``: 10 GB) or shrinking every
interval to nothing (``calibration.std_scale = 1e-3``). Each refusal is a ValueError whose message
the caller prefixes with the card's path.
"""

from __future__ import annotations

import json
import math
from typing import Any, get_args

from matbalora.config import Method

#: Bytes of a config.json (the shipped cards hold about 7 kB).
MAX_CONFIG_BYTES = 4 * 2**20
#: Nesting depth of a config.json (the shipped cards: 5).
MAX_CONFIG_DEPTH = 32
#: Adapter rank, head width and head depth allowed (the shipped models: 8, 64, 2).
MAX_RANK = 256
MAX_HEAD_HIDDEN = 2048
MAX_HEAD_LAYERS = 16
#: MLPs of a separate variance head (the shipped BaLoRA: 5).
MAX_VARIANCE_MEMBERS = 64
MAX_GAP_MEMBERS = 64
#: Blocks an adapter may be limited to (``last_blocks``; CHGNet has 4 or 5, SevenNet-0 5).
MAX_LAST_BLOCKS = 64
#: Strings and lists inside the adapter and head sections (target regexes).
MAX_STRING_CHARS = 1000
MAX_LIST_ITEMS = 64
#: Recalibration accepted: the scale k and the floor c (eV) of ``std' = sqrt((k s)^2 + c^2)``.
#: Fits on real validation data gave k from 1 to 1e6 (a near-zero raw spread); a k below 0.01 would
#: shrink the model's own spread a hundredfold, which no fit has produced.
STD_SCALE_RANGE = (1e-2, 1e8)
MIN_STD_SCALE_WITH_FLOOR = 1e-6
MAX_STD_FLOOR = 100.0


def parse_card(text: str) -> dict[str, Any]:
    """The JSON object of a card's text; ValueError when it is too large, too deep or not JSON."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"holds {len(text)} characters > {MAX_CONFIG_BYTES}")
    try:
        card = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if depth(card) > MAX_CONFIG_DEPTH:
        raise ValueError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(card, dict):
        raise ValueError(f"is a JSON {type(card).__name__}, expected an object")
    return card


def depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high}]")


def _number(name: str, value: Any, low: float, high: float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a finite number in [{low:g}, {high:g}]")


def _plain_section(name: str, section: Any) -> dict[str, Any]:
    """A config section: an object of finite numbers, bools, short strings and short string lists."""
    if not isinstance(section, dict):
        raise ValueError(f"{name} is {type(section).__name__}, expected an object")
    for key, value in section.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_LIST_ITEMS:
            raise ValueError(f"{name}.{key} lists {len(values)} items > {MAX_LIST_ITEMS}")
        for item in values:
            if isinstance(item, str) and len(item) <= MAX_STRING_CHARS or item is None or isinstance(item, bool):
                continue
            if isinstance(item, int | float) and math.isfinite(item):
                continue
            raise ValueError(f"{name}.{key}={str(item)[:80]!r} is not a finite number, a bool or a short string")
    return section


def check_card(card: dict[str, Any]) -> None:
    """ValueError naming the first field of ``card`` that is missing, mistyped or out of range."""
    method = card.get("method")
    if method not in get_args(Method):
        raise ValueError(f"method={method!r} is not one of {list(get_args(Method))}")
    adapter = card.get("adapter")
    if method in ("lora", "balora") or adapter is not None:
        adapter = _plain_section("adapter", adapter)
        _integer("adapter.rank", adapter.get("rank"), 1, MAX_RANK)
        _integer("adapter.last_blocks", adapter.get("last_blocks", 0), 0, MAX_LAST_BLOCKS)
    head = _plain_section("head", card.get("head"))
    _integer("head.hidden", head.get("hidden"), 1, MAX_HEAD_HIDDEN)
    _integer("head.layers", head.get("layers"), 0, MAX_HEAD_LAYERS)
    _integer("head.variance_members", head.get("variance_members", 1), 1, MAX_VARIANCE_MEMBERS)
    _integer("head.gap_members", head.get("gap_members", 1), 1, MAX_GAP_MEMBERS)
    _integer("head.variance_hidden", head.get("variance_hidden", 0), 0, MAX_HEAD_HIDDEN)
    _integer("head.variance_layers", head.get("variance_layers", -1), -1, MAX_HEAD_LAYERS)
    check_calibration(card.get("calibration"))


def check_calibration(calibration: Any) -> None:
    """ValueError for a recalibration a model card should not hold (see ``STD_SCALE_RANGE``)."""
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration is {type(calibration).__name__}, expected an object")
    _number("calibration.std_floor", calibration.get("std_floor", 0.0), 0.0, MAX_STD_FLOOR)
    # without a floor, a tiny scale makes zero-width intervals; with one, widths stay >= the floor and a
    # small k is a real fit (a head whose learned aleatoric sigma is far too wide on a small split)
    low = STD_SCALE_RANGE[0] if not calibration.get("std_floor") else MIN_STD_SCALE_WITH_FLOOR
    _number("calibration.std_scale", calibration.get("std_scale", 1.0), low, STD_SCALE_RANGE[1])
    conformal = calibration.get("conformal")
    if conformal is not None:
        if not isinstance(conformal, dict):
            raise ValueError(f"calibration.conformal is {type(conformal).__name__}, expected an object")
        q = conformal.get("q")
        if not (isinstance(q, float) and q == math.inf):  # inf: a validation split too small for the level (ConformalIntervals)
            _number("calibration.conformal.q", q, 0.0, 1e8)
        _number("calibration.conformal.level", conformal.get("level"), 1e-6, 1 - 1e-6)
    mondrian = calibration.get("mondrian")
    if mondrian is not None:
        check_mondrian(mondrian)


#: Classes and validation scores per class a Mondrian calibration may hold.
MAX_MONDRIAN_CLASSES = 16
MAX_MONDRIAN_SCORES = 10**6


def check_mondrian(section: Any) -> None:
    """ValueError for a ``calibration.mondrian`` that is not lists of plain non-negative numbers."""
    name = "calibration.mondrian"
    if not isinstance(section, dict):
        raise ValueError(f"{name} is {type(section).__name__}, expected an object")
    scores, edges = section.get("scores"), section.get("gap_edges", [1.0, 3.0])
    if not isinstance(edges, list) or not 1 <= len(edges) <= MAX_MONDRIAN_CLASSES - 2:
        raise ValueError(f"{name}.gap_edges must list 1-{MAX_MONDRIAN_CLASSES - 2} gaps (eV)")
    for k, edge in enumerate(edges):
        _number(f"{name}.gap_edges[{k}]", edge, 1e-6, 1e3)
    if not isinstance(scores, list) or len(scores) != len(edges) + 2:
        raise ValueError(f"{name}.scores must list one array per class ({len(edges) + 2})")
    for c, values in enumerate(scores):
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_MONDRIAN_SCORES:
            raise ValueError(f"{name}.scores[{c}] must list 1-{MAX_MONDRIAN_SCORES} numbers")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1e8 for v in values):
            raise ValueError(f"{name}.scores[{c}] must hold finite numbers in [0, 1e8]")
    _number(f"{name}.metal_p", section.get("metal_p", 0.5), 1e-6, 1.0)
    _number(f"{name}.metal_threshold", section.get("metal_threshold", 0.05), 0.0, 10.0)
