"""The Streamlit app through Streamlit's AppTest, on tiny model folders."""

from __future__ import annotations

import io
import threading

import pytest

pytest.importorskip("streamlit")
from app_helpers import make_models
from conftest import REPO, rocksalt_nacl, silicon
from streamlit.testing.v1 import AppTest

APP = REPO / "matbalora" / "app" / "streamlit_app.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    return make_models(tmp_path_factory.mktemp("app_models"), tiny_checkpoint)


@pytest.fixture
def app(monkeypatch, models):
    monkeypatch.setenv("MATBALORA_MODELS", str(models))
    return lambda: AppTest.from_file(str(APP), default_timeout=120)


def cif(structure) -> bytes:
    return structure.to(fmt="cif").encode()


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "error", "subheader", "title") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_first_render(app):
    at = app().run()
    assert not at.exception
    assert at.title[0].value.startswith("Band gaps")
    assert "Upload CIF" in at.info[0].value
    assert len(at.file_uploader) == 1 and "200 atoms per structure" in texts(at)


def expected_rows(models, data: bytes, window) -> tuple[dict, dict]:
    """What ``predict`` gives (at the app's defaults and ``window``) for the crystal in the CIF ``data``
    as the app reads it: the BaLoRA row and the ensemble row."""
    from matbalora import app as sup
    from matbalora.api import load_ensemble, load_model
    from matbalora.defaults import LEVEL, SAMPLES

    (item,) = sup.read_upload("Si.cif", data)
    balora = load_model(models / "balora").predict([item.structure], samples=SAMPLES, level=LEVEL, window=window)
    ensemble = load_ensemble(models / "lora_ensemble").predict([item.structure], level=LEVEL, window=window)
    return balora.iloc[0].to_dict(), ensemble.iloc[0].to_dict()


def test_upload_shows_both_intervals_and_the_probabilities_in_words(app, models):
    data = cif(silicon())
    at = app().run()
    at.file_uploader[0].upload("Si.cif", data, "chemical/x-cif")
    at.run()
    assert not at.exception and not at.error
    shown = texts(at)
    assert "Predicted band gap:" in shown and "Reading: " in shown
    assert [m.label for m in at.metric] == ["BaLoRA", "Deep ensemble (LoRA)"]
    assert sum("90% interval:" in c.value for c in at.caption) == 2
    for window, event, span in (((1.0, 2.0), "1 eV ≤ gap ≤ 2 eV", "in 1–2 eV"), ((0.0, 1.5), "0 eV ≤ gap ≤ 1.5 eV", "in 0–1.5 eV")):
        if window != (1.0, 2.0):  # the page starts at 1-2 eV; then the user picks another window
            at.number_input(key="window_lo").set_value(window[0])
            at.number_input(key="window_hi").set_value(window[1])
            at.run()
            assert not at.exception
        balora, ensemble = expected_rows(models, data, window)
        captions = [c.value for c in at.caption]
        for row in (balora, ensemble):
            assert f"P(metal) = {row['p_metal']:.2f}; P({event}) = {row['p_window']:.2f}" in captions, (window, captions)
        (info,) = [i.value for i in at.info]
        assert f"to be a metal (P = {balora['p_metal']:.2f})" in info, info
        assert f"to have a gap {span} (P = {balora['p_window']:.2f})" in info, info
        assert f"90% interval {balora['lower']:.2f}–{balora['upper']:.2f} eV" in info, info
        assert "could be" not in info
        table = at.dataframe[0].value
        assert table.loc[0, "formula"] == "Si" and (table.loc[0, "window_lo"], table.loc[0, "window_hi"]) == window
        for prefix, row in (("balora", balora), ("ensemble", ensemble)):
            for key in ("band_gap", "lower", "upper", "p_metal", "p_window"):
                assert table.loc[0, f"{prefix}_{key}"] == pytest.approx(row[key], abs=1e-6), (prefix, key)
    at.number_input(key="window_hi").set_value(0.0).run()  # an empty window: said so, no window probability
    assert not at.exception and any("from < to" in w.value for w in at.warning)
    assert not any("P(0 eV ≤ gap" in c.value for c in at.caption) and "balora_p_window" not in at.dataframe[0].value


def test_class_conditional_intervals_are_shown_as_predict_returns_them(monkeypatch, models, tmp_path):
    """A card with Mondrian conformal intervals: the page shows predict's (asymmetric in q per class,
    not the Gaussian of std) lower/upper and says how they were made."""
    import json
    import shutil

    from matbalora.conformal import MondrianIntervals

    folder = tmp_path / "models"
    shutil.copytree(models, folder)
    config = json.loads((folder / "balora" / "config.json").read_text())
    scores = [[0.5, 1.0, 1.5], [0.2, 0.4, 0.6, 3.0], [0.1, 0.3], [2.0, 2.5]]  # metal, 0-1, 1-3, >3 eV
    config["calibration"]["mondrian"] = MondrianIntervals(scores).to_dict()
    (folder / "balora" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("MATBALORA_MODELS", str(folder))
    data = cif(silicon())
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.file_uploader[0].upload("Si.cif", data, "chemical/x-cif")
    at.run()
    assert not at.exception and not at.error
    balora, _ = expected_rows(folder, data, (1.0, 2.0))
    gaussian = expected_rows(models, data, (1.0, 2.0))[0]
    assert (balora["lower"], balora["upper"]) != pytest.approx((gaussian["lower"], gaussian["upper"]))  # the card's intervals
    captions = [c.value for c in at.caption]
    assert f"90% interval: {balora['lower']:.2f} – {balora['upper']:.2f} eV (σ = {balora['std']:.2f} eV)" in captions
    assert any("for each predicted class (metal; gap 0-1, 1-3, >3 eV), so it holds 90% per class" in c for c in captions)
    assert at.dataframe[0].value.loc[0, "balora_upper"] == pytest.approx(balora["upper"], abs=1e-6)


def test_bad_uploads_show_messages_and_the_rest_work(app):
    disordered = silicon()
    disordered.replace_species({"Si": {"Si": 0.5, "Ge": 0.5}})
    at = app().run()
    for name, data in [("junk.cif", b"data_junk\nthis is not a cif\n"), ("alloy.cif", cif(disordered)),
                       ("huge.cif", b"#" * (2 * 1024 * 1024 + 1)), ("../../etc/passwd", b"root:x:0:0"),
                       ("NaCl.cif", cif(rocksalt_nacl()))]:
        at.file_uploader[0].upload(name, data)
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 4, errors
    assert any("junk.cif" in e and "could not be read" in e for e in errors)
    assert any("alloy.cif" in e and "disordered" in e for e in errors)
    assert any("huge.cif" in e and "the limit is 2 MB" in e for e in errors)
    assert any("**passwd**" in e and "unknown file type" in e for e in errors)
    assert "Predicted band gap:" in texts(at) and "NaCl" in at.subheader[0].value
    table = at.dataframe[0].value
    assert len(table) == 5 and table["balora_band_gap"].notna().sum() == 1


def test_sessions_do_not_see_each_other(app, monkeypatch):
    """Two sessions uploading different crystals at the same time each see only their own."""
    # A server compiles its scripts once, under a lock, in one ScriptCache for all sessions; AppTest
    # makes a cache per run, and two threads compiling at once trip CPython 3.11's AST
    # recursion-depth check ("AST constructor recursion depth mismatch"). Share one, as a server does.
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner

    shared = ScriptCache()
    monkeypatch.setattr(local_script_runner, "ScriptCache", lambda: shared)
    monkeypatch.setattr(app_test, "ScriptCache", lambda: shared)
    sessions = {"Si": app().run(), "NaCl": app().run()}
    sessions["Si"].file_uploader[0].upload("mine.cif", cif(silicon()))
    sessions["NaCl"].file_uploader[0].upload("mine.cif", cif(rocksalt_nacl()))
    threads = [threading.Thread(target=at.run) for at in sessions.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for formula, at in sessions.items():
        assert not at.exception
        assert at.dataframe[0].value["formula"].tolist() == [formula]
        assert formula in at.subheader[0].value


def test_model_card_page(app, models):
    from matbalora import app as sup

    at = app().run()
    at.switch_page("pages/model_card.py").run()
    assert not at.exception
    assert [h.value for h in at.header] == ["BaLoRA", "Deep ensemble"]
    mae = sup.model_cards(models)["BaLoRA"]["metrics"]["test"]["mae"]  # the tiny card's, read back
    metrics = at.table[0].value
    assert metrics.loc["MAE (eV)"].tolist() == [f"{mae:.3f}"] and list(metrics.columns) == ["all crystals"]
    recipe = at.table[1].value
    assert recipe.loc["method", "value"] == "balora"
    assert [e.label for e in at.expander] == ["Raw model card (JSON)", "Raw model card (JSON)"]
    assert any("No calibration, parity or sparsification plot" in i.value for i in at.info)


def test_screen_page_table_and_csv(app):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, [AseAtomsAdaptor.get_atoms(s) for s in (silicon(), rocksalt_nacl(), silicon())], format="extxyz")
    at = app().run()
    at.switch_page("pages/screen.py").run()
    assert not at.exception and "Upload structure files" in at.info[0].value
    at.file_uploader[0].upload("set.extxyz", buf.getvalue().encode())
    at.file_uploader[0].upload("junk.cif", b"data_x\nnot a cif")
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert sorted(table["structure"]) == ["junk", "set#0", "set#1", "set#2"]
    p_window = table["balora_p_window"].dropna().tolist()  # most likely in the window first
    assert len(p_window) == 3 and p_window == sorted(p_window, reverse=True) and table["balora_band_gap"].isna().tolist()[-1]
    assert {"balora_p_metal", "ensemble_p_metal", "ensemble_p_window", "window_lo", "window_hi"} <= set(table.columns)
    assert (table["window_lo"].iloc[0], table["window_hi"].iloc[0]) == (1.0, 2.0)
    assert "could not be read" in table["message"].iloc[-1]
    assert "3 of 4 structures predicted" in at.markdown[0].value and "P(gap in 1–2 eV)" in at.markdown[0].value
    assert at.get("download_button")[0].proto.label == "Download CSV"
    at.number_input(key="batch_window_lo").set_value(2.5)
    at.number_input(key="batch_window_hi").set_value(6.0)
    at.run()
    table = at.dataframe[0].value
    p_window = table["balora_p_window"].dropna().tolist()
    assert not at.exception and (table["window_lo"].iloc[0], table["window_hi"].iloc[0]) == (2.5, 6.0)
    assert p_window == sorted(p_window, reverse=True) and "P(gap in 2.5–6 eV)" in at.markdown[0].value


def test_missing_models_say_so(monkeypatch, tmp_path):
    monkeypatch.setenv("MATBALORA_MODELS", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert "could not be loaded" in at.error[0].value and str(tmp_path) in at.error[0].value
