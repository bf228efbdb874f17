"""End to end: a real headless Chromium (Debian's, driven by Playwright) against a running server."""

from __future__ import annotations

import os
import re

import pytest
from app_helpers import CHROMIUM, CHROMIUM_ARGS, make_models, running_app
from conftest import rocksalt_nacl, silicon

if os.environ.get("MATBALORA_REQUIRE_BROWSER") == "1":  # CI: a missing browser is a failure, not a skip
    from playwright import sync_api

    assert CHROMIUM.exists(), f"MATBALORA_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)"
else:
    pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")

GAP = re.compile(r"Predicted band gap: (\d+\.\d\d) eV")
WAIT_MS = 90_000


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    return make_models(tmp_path_factory.mktemp("e2e_models"), tiny_checkpoint)


def upload(page, path) -> None:
    page.locator('input[type="file"]').set_input_files(str(path))


def test_upload_in_two_browser_sessions(models, tmp_path):
    from matbalora import app_support as sup

    files = {"Si": tmp_path / "Si.cif", "NaCl": tmp_path / "NaCl.cif"}
    other = {"Si": "NaCl", "NaCl": "Si"}
    files["Si"].write_text(silicon().to(fmt="cif"))
    files["NaCl"].write_text(rocksalt_nacl().to(fmt="cif"))
    served = sup.load_models(models)
    expected = {}
    for formula, path in files.items():
        [item] = sup.read_upload(path.name, path.read_bytes())
        expected[formula] = f"{served.predict(item.structure, samples=32, level=0.9).balora['band_gap']:.2f}"

    with running_app(models, tmp_path / "server.log") as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pages = {formula: browser.new_context().new_page() for formula in files}  # two sessions
            for page in pages.values():
                page.goto(url)
                page.get_by_text("Upload CIF, POSCAR").wait_for(timeout=WAIT_MS)
            for formula, page in pages.items():  # both uploads in flight at once
                upload(page, files[formula])
            for formula, page in pages.items():
                page.get_by_text(GAP).wait_for(timeout=WAIT_MS)
                shown = GAP.search(page.get_by_text(GAP).inner_text()).group(1)
                assert shown == expected[formula], formula
                assert page.locator("h3", has_text=re.compile(f"^{formula}$")).count() == 1
                assert page.get_by_text("90% interval:").count() == 2
                page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)  # cell, intervals, samples
                assert page.get_by_text(other[formula], exact=True).count() == 0  # nothing of the other session
        finally:
            browser.close()
