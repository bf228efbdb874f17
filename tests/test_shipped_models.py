"""The shipped models on the textbook crystals of the README's main command (issues 4 and 14):
plausible PBE gaps, intervals that contain them, tight intervals on metals, and the issue-14 target:
diamond, MgO, LiF, corundum, KCl, Si and GaAs within 25 % (or 0.3 eV) of their PBE gaps.
Guards against re-shipping a model that breaks them; the PBE values are Materials Project's for the
same structures (``shared/data/mp_gap``; the diamond, corundum and KCl files were written from it)."""

from __future__ import annotations

import pytest

import matbalora
from conftest import REPO

EXAMPLES = REPO / "data" / "examples"
SHIPPED = REPO / "models"
PBE = {"Si_diamond": 0.61, "NaCl_rocksalt": 5.00, "Cu_fcc": 0.0, "Al_fcc": 0.0, "C_diamond": 4.11, "MgO_rocksalt": 4.44,
       "LiF_rocksalt": 8.72, "Al2O3_corundum": 5.85, "KCl_rocksalt": 5.03, "GaAs_zincblende": 0.19}
#: issue 14: within 25 % of PBE or 0.3 eV, whichever is larger
TARGET = ("C_diamond", "MgO_rocksalt", "LiF_rocksalt", "Al2O3_corundum", "KCl_rocksalt", "Si_diamond", "GaAs_zincblende")
#: (model, crystal) pairs measured outside the target on the shipped models: strict xfail, so the test
#: fails once they land inside (then remove them here) and the README's table says the same
KNOWN_MISSES: set[tuple[str, str]] = set()
#: (model, crystal) pairs whose 90 % interval was measured not to hold the PBE gap (strict xfail as above)
KNOWN_INTERVAL_MISSES: set[tuple[str, str]] = {("ensemble", "LiF_rocksalt"), ("ensemble", "Al2O3_corundum")}

pytestmark = pytest.mark.skipif(not (SHIPPED / "balora" / "config.json").is_file() or not (SHIPPED / "lora_ensemble").is_dir(),
                                reason="models/ holds no shipped models")


@pytest.fixture(scope="module")
def predictions():
    from pymatgen.core import Structure

    structures, ids = [Structure.from_file(EXAMPLES / f"{name}.cif") for name in PBE], list(PBE)
    model, ensemble = matbalora.load_model(SHIPPED / "balora"), matbalora.load_ensemble(SHIPPED / "lora_ensemble")
    return {"balora": model.predict(structures, ids=ids, samples=16).set_index("id"), "ensemble": ensemble.predict(structures, ids=ids).set_index("id")}


@pytest.mark.parametrize("which", ["balora", "ensemble"])
@pytest.mark.parametrize("name", list(PBE))
def test_interval_holds_the_pbe_gap(predictions, which, name, request):
    if (which, name) in KNOWN_INTERVAL_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="measured: the 90 % interval misses PBE (README table)"))
    row, pbe = predictions[which].loc[name], PBE[name]
    assert row["lower"] <= pbe <= row["upper"], f"{which} {name}: [{row['lower']:.2f}, {row['upper']:.2f}] misses PBE {pbe}"


@pytest.mark.parametrize("which", ["balora", "ensemble"])
def test_metals_are_tight(predictions, which):
    df = predictions[which]
    for metal in ("Cu_fcc", "Al_fcc"):
        assert df.loc[metal, "band_gap"] < 0.1, f"{which} {metal}: {df.loc[metal, 'band_gap']:.2f} eV for a metal"
        assert df.loc[metal, "upper"] < 1.0, f"{which} {metal}: interval up to {df.loc[metal, 'upper']:.2f} eV is not tight"


@pytest.mark.parametrize("which", ["balora", "ensemble"])
@pytest.mark.parametrize("name", TARGET)
def test_textbook_gap_within_25_percent_of_pbe(predictions, which, name, request):
    if (which, name) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="measured outside the issue-14 target (README table)"))
    pbe = PBE[name]
    got = predictions[which].loc[name, "band_gap"]
    assert abs(got - pbe) <= max(0.25 * pbe, 0.3), f"{which} {name}: {got:.2f} eV vs PBE {pbe}"
