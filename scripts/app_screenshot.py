"""Screenshot the app's main view to docs/app_screenshot.png and time upload -> result.

Serves the app on a free localhost port, opens it in Debian's headless Chromium (Playwright),
uploads a 20-atom crystal (β-Ga2O3, conventional cell) as a CIF and waits for the predicted band
gap. Uses the shipped models when ``models/`` holds both ``balora/`` and ``lora_ensemble/``;
otherwise builds stand-in models (``--backbone pretrained``: untrained adapters on the real
CHGNet 0.3.0, realistic timing; ``tiny``: the 16-dim test CHGNet). Prints the timings as JSON.

    python scripts/app_screenshot.py [--models DIR] [--backbone pretrained|tiny] [--out PNG]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server/model helpers shared with the app tests

from app_helpers import CHROMIUM, CHROMIUM_ARGS, make_models, running_app

from matbalora import app as sup

GAP = re.compile(r"Predicted band gap: (\d+\.\d\d) eV")
CRYSTAL = "β-Ga2O3 (monoclinic, 20 atoms)"


def stand_in_models(root: Path, backbone: str) -> Path:
    checkpoint = None
    if backbone == "tiny":
        import torch
        from conftest import tiny_chgnet

        checkpoint = root / "tiny_chgnet.pth.tar"
        torch.save({"model": tiny_chgnet().as_dict()}, checkpoint)
    return make_models(root / "models", checkpoint, members=5)


def upload_and_wait(page, path: Path) -> float:
    """Seconds from handing the file to the uploader to the predicted value on screen."""
    start = time.perf_counter()
    page.locator('input[type="file"]').set_input_files(str(path))
    page.get_by_text(GAP).wait_for(timeout=600_000)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, help="models folder (default: the shipped models/ when complete)")
    ap.add_argument("--backbone", choices=("pretrained", "tiny"), default="pretrained", help="stand-in models when none are shipped")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "app_screenshot.png")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="matbalora-shot-") as tmp:
        tmp = Path(tmp)
        shipped = REPO / "models"
        models = args.models or (shipped if all((shipped / n).is_dir() for n in ("balora", "lora_ensemble")) else None)
        source = str(models) if models else f"stand-in ({args.backbone} backbone, untrained adapters)"
        models = models or stand_in_models(tmp, args.backbone)
        crystal = sup.example(CRYSTAL).structure
        cif = tmp / "Ga2O3.cif"
        cif.write_text(crystal.to(fmt="cif"))
        strained = tmp / "Ga2O3_strained.cif"  # a different crystal: not served from the cache
        crystal.scale_lattice(crystal.volume * 1.02)
        strained.write_text(crystal.to(fmt="cif"))
        with running_app(models, tmp / "server.log", timeout=300) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            start = time.perf_counter()
            page.goto(url)
            page.get_by_text("Upload CIF, POSCAR").wait_for(timeout=600_000)
            first_render = time.perf_counter() - start
            cold = upload_and_wait(page, cif)
            page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)
            other = browser.new_page(viewport={"width": 1500, "height": 1400})  # a second session
            other.goto(url)
            other.get_by_text("Upload CIF, POSCAR").wait_for(timeout=600_000)
            warm = upload_and_wait(other, strained)
            page.wait_for_timeout(2000)  # let the WebGL cell view draw
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(json.dumps({"models": source, "atoms": len(crystal), "first_render_s": round(first_render, 2),
                      "upload_to_result_s": round(cold, 2), "upload_to_result_next_session_s": round(warm, 2),
                      "screenshot": str(args.out)}))


if __name__ == "__main__":
    main()
