"""The full-pool benchmark's registry of runs (benchmarks/full_pool.py) against the shipped models: a
fresh machine has no runs/, so ``ship``, ``claims`` and the retention benchmark find a run through the
shipped card whose command made it, and the command a card records must be one that makes it."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
SHIPPED = REPO / "models"

pytestmark = pytest.mark.skipif(not (SHIPPED / "lora_ensemble" / "ensemble.json").is_file(), reason="models/ holds no shipped models")


@pytest.fixture()
def full_pool(tmp_path, monkeypatch):
    import full_pool

    monkeypatch.setattr(full_pool, "RUNS", tmp_path / "no_runs")  # as on a fresh machine
    return full_pool


def _commands(command: str) -> list[list[str]]:
    """The ``full_pool.py`` invocations of a card's command, as argument lists."""
    out = []
    for part in command.split("&&"):
        words = shlex.split(part)
        script = next((k for k, w in enumerate(words) if w.endswith("full_pool.py")), None)
        if script is not None:
            out.append(words[script + 1 :])
    return out


def test_every_shipped_ensemble_member_resolves_to_its_own_seed_on_a_fresh_machine(full_pool):
    card = json.loads((SHIPPED / "lora_ensemble" / "ensemble.json").read_text())
    for member, run in zip(card["members"], card["runs"], strict=True):
        assert full_pool.finished_run(run) == SHIPPED / "lora_ensemble" / member, run


def test_the_shipped_balora_resolves_from_the_run_its_card_names(full_pool):
    words = _commands(json.loads((SHIPPED / "balora" / "config.json").read_text())["command"])[0]
    assert full_pool.finished_run(words[1]) == SHIPPED / "balora"


def test_the_shipped_cards_record_commands_that_parse_and_make_their_runs(full_pool):
    parser = full_pool.build_parser()
    ensemble = json.loads((SHIPPED / "lora_ensemble" / "ensemble.json").read_text())
    commands = _commands(ensemble["command"]) + _commands(json.loads((SHIPPED / "balora" / "config.json").read_text())["command"])
    assert commands
    for argv in commands:
        parser.parse_args(argv)  # an unknown verb or run name exits (SystemExit) and fails the test
    made = _commands(ensemble["command"])[0]
    assert made[0] == full_pool.producing_verb(ensemble["runs"][0]) and set(ensemble["runs"]) <= set(made[1:])
    assert full_pool.producing_verb("balora_full_2blocks_10ep") == "train" and full_pool.producing_verb("lora_full_2blocks_4ep_var5_seed1") == "revar"
