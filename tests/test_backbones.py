"""The backbone interface: one registry read by the model, the CLI and model folders; limits that
validation takes from the backbone; no import cycles in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from matbalora.backbones import BACKBONES, DEFAULT_BACKBONE, get_backbone
from matbalora.backbones.base import Backbone
from matbalora.data.validation import DEFAULT_LIMITS, GraphLimits, check_structure

PACKAGE = Path(__file__).resolve().parents[1] / "matbalora"
#: import cycles allowed (none): any cycle fails the test
KNOWN_CYCLES: list[set[str]] = []


def test_registry_names_every_family_and_refuses_others():
    assert DEFAULT_BACKBONE == next(iter(BACKBONES))
    for name in BACKBONES:
        family = get_backbone(name)
        assert isinstance(family, Backbone) and family.name == name and family.default_targets
    with pytest.raises(ValueError, match=r"backbone='mace' is not known; choose one of \['chgnet', 'sevennet'\]"):
        get_backbone("mace")
    with pytest.raises(ValueError, match="is not known"):
        get_backbone(["chgnet"])


def test_cli_choices_are_the_registry():
    from matbalora.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    (action,) = [a for a in train._actions if a.dest == "backbone"]
    assert list(action.choices) == list(BACKBONES) and action.default == DEFAULT_BACKBONE


def test_default_limits_are_the_default_backbones():
    """Validation's defaults are what the pretrained default backbone declares."""
    family = get_backbone(DEFAULT_BACKBONE)
    assert family.limits(family.load(None)) == DEFAULT_LIMITS


def test_limits_of_the_tiny_chgnet(tiny_backbone):
    assert get_backbone("chgnet").limits(tiny_backbone) == GraphLimits(cutoff=6.0, bond_cutoff=3.0, max_atomic_number=94)


def test_validation_uses_the_limits_it_is_given(crystals):
    silicon = crystals[0]  # nearest neighbours at 2.35 Å
    assert check_structure(silicon) is None
    assert check_structure(silicon, limits=GraphLimits(cutoff=2.0, bond_cutoff=None, max_atomic_number=94))[0] == "isolated_atom"
    reason, detail = check_structure(silicon, limits=GraphLimits(cutoff=6.0, bond_cutoff=None, max_atomic_number=94, elements=frozenset({8})))
    assert reason == "unsupported_element" and "1 elements up to Z=94" in detail
    assert check_structure(silicon, limits=GraphLimits(cutoff=6.0, bond_cutoff=3.0, max_atomic_number=13))[0] == "unsupported_element"


def _imports() -> dict[str, set[str]]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("matbalora"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t not in (name, "matbalora")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert [c for c in _cycles(_imports()) if c not in KNOWN_CYCLES] == []
