"""The web app's logic without Streamlit: uploads, summaries, readings, predictions, figures."""

from __future__ import annotations

import gzip
import io
import threading

import numpy as np
import pytest
from app_helpers import make_models
from conftest import perovskite, rocksalt_nacl, silicon
from pymatgen.core import Lattice, Structure

from matbalora import app_support as sup
from matbalora.data.validation import check_structure


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    return sup.load_models(make_models(tmp_path_factory.mktemp("models"), tiny_checkpoint))


def test_display_name_is_a_label_not_a_path():
    assert sup.display_name("../../etc/passwd") == "passwd"
    assert sup.display_name("C:\\Users\\me\\Si.cif") == "Si.cif"
    assert sup.display_name("a\x00b\nc.cif") == "abc.cif"
    assert sup.display_name("") == "upload" and len(sup.display_name("x" * 500)) == 80


def test_read_upload_formats(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the private folder must be cleaned up
    [cif] = sup.read_upload("../Si.cif", silicon().to(fmt="cif").encode())
    assert (cif.source, cif.id, len(cif.structure)) == ("Si.cif", "Si", 2) and len(cif.key) == 64 and not cif.error
    [poscar] = sup.read_upload("POSCAR", rocksalt_nacl().to(fmt="poscar").encode())
    assert poscar.structure.composition.reduced_formula == "NaCl"
    [gz] = sup.read_upload("STO.cif.gz", gzip.compress(perovskite().to(fmt="cif").encode()))
    assert (gz.id, len(gz.structure)) == ("STO", 5)
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, [AseAtomsAdaptor.get_atoms(s) for s in (silicon(), perovskite())], format="extxyz")
    frames = sup.read_upload("set.extxyz", buf.getvalue().encode())
    assert [f.id for f in frames] == ["set#0", "set#1"] and all(f.structure is not None for f in frames)
    many = sup.read_upload("set.extxyz", (buf.getvalue() * 3).encode(), limits=sup.Limits(max_structures=4))
    assert "more than 4 structures" in many[0].error and sum(f.structure is not None for f in many) == 4
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "data", "message"), [
    ("big.cif", b"x" * (2 * 1024 * 1024 + 1), "the limit is 2 MB"),
    ("notes.txt", b"hello", "unknown file type"),
    ("junk.cif", b"data_x\nnot a cif", "could not be read"),
    ("empty.extxyz", b"", "no structure found"),
])
def test_read_upload_bad_files(name, data, message):
    [item] = sup.read_upload(name, data)
    assert item.structure is None and message in item.error and item.source == name


def test_read_upload_disordered_and_too_large_structures(tmp_path):
    alloy = silicon()
    alloy.replace_species({"Si": {"Si": 0.5, "Ge": 0.5}})
    [item] = sup.read_upload("alloy.cif", alloy.to(fmt="cif").encode())
    assert "disordered" in item.error
    big = silicon() * (2, 2, 2)
    [item] = sup.read_upload("big.cif", big.to(fmt="cif").encode(), limits=sup.Limits(max_atoms=8))
    assert "too many atoms" in item.error and "16 atoms" in item.error
    assert str(tmp_path) not in item.error and "upload" not in item.error


def test_uploads_are_bounded_in_files_decompressed_size_and_time(monkeypatch):
    """Issue 18, item 4: before, the number of files, a .gz upload's decompressed size and the
    time spent parsing and predicting were not bounded."""
    limits = sup.Limits(max_files=2, max_decompressed_mb=1, max_parse_seconds=1, max_predict_seconds=1)
    cif = silicon().to(fmt="cif").encode()
    items = sup.read_uploads([(f"s{i}.cif", cif) for i in range(4)], limits=limits)
    assert [item.error for item in items[2:]] == ["skipped: more than 2 files at a time"] * 2
    assert all(item.structure is not None for item in items[:2])
    bomb = gzip.compress(b" " * (2 << 20))  # 2 kB that decompress to 2 MB
    [item] = sup.read_upload("bomb.json.gz", bomb, limits=limits)
    assert item.structure is None and "decompresses to more than 1 MB" in item.error
    clock = iter(range(0, 1000, 2))  # every reading of the clock: 2 s later
    monkeypatch.setattr(sup.time, "monotonic", lambda: next(clock))
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, [AseAtomsAdaptor.get_atoms(silicon())] * 5, format="extxyz")
    found = sup.read_upload("set.extxyz", buf.getvalue().encode(), limits=limits)
    assert "reading stopped after 1 s" in found[0].error and sum(f.structure is not None for f in found) == 1
    monkeypatch.undo()
    started = sup.time.monotonic()
    assert sup.out_of_time(started, limits=limits) == "" and "prediction time (1 s)" in sup.out_of_time(started - 10, limits=limits)


def test_collect_makes_ids_unique_and_caps_the_count():
    si = sup.example("Si (diamond)")
    bad = sup.Item("x.cif", "x", error="could not be read")
    out = sup.collect([si, si, bad, si], limits=sup.Limits(max_structures=2))
    assert [i.id for i in out] == ["Si", "Si (2)", "x", "Si (3)"]
    assert out[1].structure is not None and out[3].structure is None and "more than 2" in out[3].error
    with pytest.raises(ValueError, match="max_atoms"):
        sup.Limits(max_atoms=0)


def test_examples_are_valid_crystals():
    for name in sup.EXAMPLES:
        item = sup.example(name)
        assert check_structure(item.structure) is None, name
    assert len(sup.example("β-Ga2O3 (monoclinic, 20 atoms)").structure) == 20
    with pytest.raises(ValueError, match="unknown example"):
        sup.example("unobtainium")


def test_summarize():
    si = sup.summarize(sup.example("Si (diamond)").structure)  # the primitive cell of diamond
    assert (si["formula"], si["space group"], si["atoms"], si["crystal system"]) == ("Si", "Fd-3m (227)", 2, "cubic")
    assert si["a, b, c (Å)"] == "3.866, 3.866, 3.866" and si["α, β, γ (°)"] == "60.00, 60.00, 60.00"
    sto = sup.summarize(perovskite())
    assert (sto["space group"], sto["volume (Å³)"], sto["a, b, c (Å)"]) == ("Pm-3m (221)", 59.32, "3.900, 3.900, 3.900")
    ga = sup.summarize(sup.example("β-Ga2O3 (monoclinic, 20 atoms)").structure)
    assert (ga["formula"], ga["space group"], ga["cell formula"]) == ("Ga2O3", "C2/m (12)", "Ga8O12")


@pytest.mark.parametrize(("gap", "lo", "hi", "text"), [
    (0.0, 0.0, 0.05, "likely a metal"),
    (0.05, 0.0, 0.8, "a metal; uncertain (could be a small-gap semiconductor)"),
    (2.0, 1.8, 2.5, "likely a semiconductor"),
    (5.0, 3.0, 7.0, "a wide-gap insulator; uncertain (could be a semiconductor)"),
    (0.5, 0.0, 4.0, "a small-gap semiconductor; uncertain (could be a metal or a semiconductor or a wide-gap insulator)"),
    (float("nan"), 0.0, 1.0, "no prediction"),
])
def test_reading(gap, lo, hi, text):
    assert sup.reading(gap, lo, hi) == text


def test_predict_structure(models):
    pred = models.predict(perovskite(), samples=16, level=0.8)
    b, e = pred.balora, pred.ensemble
    assert pred.draws.shape == (16,) and pred.draws.std() > 0 and not pred.error and pred.level == 0.8
    assert b["band_gap"] == pytest.approx(pred.draws.mean(), abs=1e-9)  # the draws behind the row
    assert b["lower"] <= b["band_gap"] <= b["upper"] and e["lower"] <= e["band_gap"] <= e["upper"]
    direct = models.ensemble.predict([perovskite()], level=0.8).iloc[0]
    assert e["band_gap"] == pytest.approx(direct["band_gap"]) and e["upper"] == pytest.approx(direct["upper"])
    lone = Structure(Lattice.cubic(20.0), ["Si"], [[0, 0, 0]])
    assert "isolated_atom" in models.predict(lone, samples=4, level=0.9).error


def test_models_serve_concurrent_callers_one_at_a_time(models):
    crystals = [silicon(), rocksalt_nacl(), perovskite()]
    expected = [models.predict(s, samples=4, level=0.9).balora for s in crystals]
    got = [None] * len(crystals)

    def run(i):
        got[i] = models.predict(crystals[i], samples=4, level=0.9).balora

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(crystals))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_figures():
    pred = sup.Prediction({"band_gap": 1.0, "std": 0.2, "lower": 0.7, "upper": 1.4},
                          {"band_gap": 1.2, "std": 0.1, "lower": 1.0, "upper": 1.3}, np.array([0.8, 1.0, 1.2]), 0.9)
    fig = sup.interval_figure(pred)
    assert [t.y[0] for t in fig.data] == ["BaLoRA", "Deep ensemble (5 LoRA)"]
    assert fig.data[0].error_x.array[0] == pytest.approx(0.4) and fig.data[0].error_x.arrayminus[0] == pytest.approx(0.3)
    assert "90% intervals" in fig.layout.title.text
    hist = sup.samples_figure(pred)
    assert list(hist.data[0].x) == [0.8, 1.0, 1.2] and len(hist.layout.shapes) == 3
    cell = sup.cell_figure(perovskite())  # Sr on the 8 corners, Ti in the body, O on 6 face centres
    counts = {t.name: len(t.x) for t in cell.data if t.mode == "markers"}
    assert counts == {"O": 6, "Sr": 8, "Ti": 1}
    assert np.isfinite(np.array(cell.data[-1].x, dtype=float)).sum() == 24  # 12 edges


def test_batch_table():
    good = sup.example("Si (diamond)")
    pred = sup.Prediction({"band_gap": 1.0, "std": 0.1, "lower": 0.8, "upper": 1.2},
                          {"band_gap": 1.1, "std": 0.1, "lower": 0.9, "upper": 1.3}, np.ones(3), 0.9)
    bad = sup.Item("junk.cif", "junk", error="could not be read")
    table = sup.batch_table([(good, pred), (bad, None)])
    assert table["structure"].tolist() == ["Si", "junk"] and table.loc[0, "reading"] == "likely a small-gap semiconductor"
    assert table.loc[1, "message"] == "could not be read" and np.isnan(table.loc[1, "balora_band_gap"])
    assert "ensemble_upper" in table.columns and table.loc[0, "level"] == 0.9


def test_model_cards_and_benchmark_images(models, tmp_path):
    cards = sup.model_cards(models.folder)
    assert cards["BaLoRA"]["method"] == "balora" and cards["Deep ensemble"]["member card"]["method"] == "lora"
    missing = sup.model_cards(tmp_path)
    assert "error" in missing["BaLoRA"] and "error" in missing["Deep ensemble"]
    (tmp_path / "bench" / "sub").mkdir(parents=True)
    for name in ("sub/b.png", "a.svg", "notes.txt"):
        (tmp_path / "bench" / name).write_bytes(b"x")
    assert [p.name for p in sup.benchmark_images(tmp_path / "bench")] == ["a.svg", "b.png"]
    assert sup.benchmark_images(tmp_path / "absent") == []


def test_launch(monkeypatch, models, tmp_path, capsys):
    assert sup.launch(["--models", str(tmp_path)]) == 2
    assert "no balora or lora_ensemble model folder" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert sup.launch(["--models", str(models.folder), "--port", "8765", "--theme.base", "dark"]) == 0
    cmd, env = calls[0]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app/streamlit_app.py")
    assert {"--server.headless=true", "--browser.gatherUsageStats=false", "--server.port=8765"} <= set(cmd)
    assert cmd[-2:] == ["--theme.base", "dark"] and env["MATBALORA_MODELS"] == str(models.folder)
