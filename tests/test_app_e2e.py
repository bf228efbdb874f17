"""End to end: a real headless Chromium (Debian's, driven by Playwright) against a running server on
the shipped models: real CIFs uploaded, the rendered numbers compared with ``predict``'s for the same
file, and the model card page compared with the cards in the model folders."""

from __future__ import annotations

import os
import re

import pytest
from app_helpers import CHROMIUM, CHROMIUM_ARGS, running_app
from conftest import REPO

if os.environ.get("MATBALORA_REQUIRE_BROWSER") == "1":  # CI: a missing browser is a failure, not a skip
    from playwright import sync_api

    assert CHROMIUM.exists(), f"MATBALORA_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)"
else:
    pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")

GAP = re.compile(r"Predicted band gap: (\d+\.\d\d) eV")
INTERVAL = re.compile(r"(\d+)% interval: (\d+\.\d\d) – (\d+\.\d\d) eV \(σ = (\d+\.\d\d) eV\)")
WAIT_MS = 120_000
CIFS = {"Si": REPO / "data" / "examples" / "Si_diamond.cif", "NaCl": REPO / "data" / "examples" / "NaCl_rocksalt.cif"}


@pytest.fixture(scope="module")
def models():
    from matbalora.api import models_dir

    folder = models_dir()
    if not ((folder / "balora").is_dir() and (folder / "lora_ensemble").is_dir()):
        pytest.skip(f"no shipped models in {folder}")
    return folder


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with running_app(models, tmp_path_factory.mktemp("e2e") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def expected_numbers(models, path) -> dict[str, str]:
    """What ``matbalora predict PATH --ensemble`` gives for the file, as the page rounds it."""
    from matbalora.defaults import LEVEL, SAMPLES
    from matbalora.screening import predict_paths

    frame, rejected = predict_paths([str(path)], model=models / "balora", ensemble=models / "lora_ensemble",
                                    samples=SAMPLES, level=LEVEL)
    assert not rejected and len(frame) == 1
    row = frame.iloc[0]
    two = "{:.2f}".format
    return {"gap": two(row["band_gap"]),
            "balora": (f"{100 * LEVEL:g}", two(row["lower"]), two(row["upper"]), two(row["std"])),
            "ensemble": (f"{100 * LEVEL:g}", two(row["ens_lower"]), two(row["ens_upper"]), two(row["ens_std"]))}


def test_real_cifs_in_two_sessions_show_predicts_numbers(models, server, browser):
    expected = {formula: expected_numbers(models, path) for formula, path in CIFS.items()}
    other = {"Si": "NaCl", "NaCl": "Si"}
    pages = {formula: browser.new_context().new_page() for formula in CIFS}  # two sessions
    for page in pages.values():
        page.goto(server)
        page.get_by_text("Upload CIF, POSCAR").wait_for(timeout=WAIT_MS)
    for formula, page in pages.items():  # both uploads in flight at once
        page.locator('input[type="file"]').set_input_files(str(CIFS[formula]))
    for formula, page in pages.items():
        page.get_by_text(GAP).wait_for(timeout=WAIT_MS)
        assert GAP.search(page.get_by_text(GAP).inner_text()).group(1) == expected[formula]["gap"], formula
        page.get_by_text(INTERVAL).nth(1).wait_for(timeout=WAIT_MS)  # the page renders progressively: both captions
        shown = [INTERVAL.search(t).groups() for t in page.get_by_text(INTERVAL).all_inner_texts()]
        assert shown == [expected[formula]["balora"], expected[formula]["ensemble"]], formula
        assert page.locator("h3", has_text=re.compile(rf"(^|· ){formula}$")).count() == 1  # "Si_diamond · Si"
        page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)  # cell, intervals, draws
        assert page.get_by_text(other[formula], exact=True).count() == 0  # nothing of the other session


def table_rows(table) -> list[list[str]]:
    return [[c.strip() for c in row.locator("th, td").all_inner_texts()] for row in table.locator("tr").all()]


def test_model_card_page_shows_the_shipped_test_mae(models, server, browser):
    from matbalora.app.cards import card_intervals, model_cards

    cards = model_cards(models)
    intervals = {title: card_intervals(card) for title, card in cards.items()}  # from shipped.json, when it scored the card
    page = browser.new_context().new_page()
    page.goto(f"{server}/model_card")
    page.get_by_text("Data and recipe").nth(1).wait_for(timeout=WAIT_MS)  # both cards laid out
    # st.table's component loads lazily, after the headers: wait for every table's MAE row
    expected = []  # per card: its metrics table's MAE (all crystals), then (when shown) its intervals table's MAE and interval
    for title, card in cards.items():  # BaLoRA, then the ensemble
        expected.append([f"{card['metrics']['test']['mae']:.3f}"])
        if not intervals[title].empty:
            expected.append([f"{card['metrics']['test']['mae']:.3f}", intervals[title].loc["MAE (eV)", "95 % interval"]])
    page.locator("th, td").filter(has_text=re.compile(r"^\s*MAE \(eV\)\s*$")).nth(len(expected) - 1).wait_for(timeout=WAIT_MS)
    shown = []  # what follows "MAE (eV)" in each table that has that row, in page order
    for table in page.locator("table").all():
        shown += [row[row.index("MAE (eV)") + 1 :] for row in table_rows(table) if "MAE (eV)" in row]
    assert len(shown) == len(expected) and [got[: len(want)] for got, want in zip(shown, expected)] == expected
    assert page.locator("h2", has_text="BaLoRA").count() == 1 and page.locator("h2", has_text="Deep ensemble").count() == 1
