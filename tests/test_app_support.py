"""The web app's logic without Streamlit: uploads, summaries, readings, predictions, figures."""

from __future__ import annotations

import dataclasses
import gzip
import io
import threading

import numpy as np
import pytest
from app_helpers import make_models
from conftest import perovskite, rocksalt_nacl, silicon
from pymatgen.core import Lattice, Structure

from matbalora import app as sup
from matbalora.app import predictions, uploads
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
    monkeypatch.setattr(uploads.time, "monotonic", lambda: next(clock))
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, [AseAtomsAdaptor.get_atoms(silicon())] * 5, format="extxyz")
    found = sup.read_upload("set.extxyz", buf.getvalue().encode(), limits=limits)
    assert "reading stopped after 1 s" in found[0].error and sum(f.structure is not None for f in found) == 1
    monkeypatch.undo()
    started = uploads.time.monotonic()
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


def _row(gap, lo, hi, p_metal, p_window=None):
    row = {"band_gap": gap, "std": 0.3, "lower": lo, "upper": hi, "p_metal": p_metal}
    return row if p_window is None else row | {"p_window": p_window}


@pytest.mark.parametrize(("row", "window", "text"), [
    (_row(1.9, 1.2, 3.1, 0.03, 0.712), (1.0, 2.0),
     "very unlikely to be a metal (P = 0.03); likely to have a gap in 1–2 eV (P = 0.71); 90% interval 1.20–3.10 eV"),
    (_row(0.0, 0.0, 0.05, 0.996), None, "virtually certain to be a metal (P = 1.00); 90% interval 0.00–0.05 eV"),
    (_row(0.4, 0.0, 1.4, 0.45, 0.2), (1.5, float("inf")),
     "about as likely as not to be a metal (P = 0.45); unlikely to have a gap above 1.5 eV (P = 0.20); 90% interval 0.00–1.40 eV"),
    (_row(5.0, 3.0, 7.0, 0.004, 0.0), (1.0, 2.0),
     "exceptionally unlikely to be a metal (P = 0.00); exceptionally unlikely to have a gap in 1–2 eV (P = 0.00); 90% interval 3.00–7.00 eV"),
    (_row(float("nan"), 0.0, 1.0, 0.5), None, "no prediction"),
])
def test_reading_is_built_from_the_probabilities_and_the_interval(row, window, text):
    assert sup.reading(row, level=0.9, window=window) == text


def test_probabilities_text():
    assert sup.probabilities_text(_row(1.9, 1.2, 3.1, 0.031, 0.7149), (1.0, 2.0)) == "P(metal) = 0.03; P(1 eV ≤ gap ≤ 2 eV) = 0.71"
    assert sup.probabilities_text(_row(1.9, 1.2, 3.1, 0.031, 0.7), None) == "P(metal) = 0.03"
    assert sup.probabilities_text(_row(1.9, 1.2, 3.1, 0.5, 0.25), (1.5, float("inf"))) == "P(metal) = 0.50; P(gap ≥ 1.5 eV) = 0.25"
    assert sup.probabilities_text({}, (1.0, 2.0)) == ""
    from matbalora.app.gaps import likelihood

    assert [likelihood(p) for p in (1.0, 0.9, 0.66, 0.5, 0.1, 0.01, 0.0)] == [
        "virtually certain", "very likely", "likely", "about as likely as not", "unlikely", "very unlikely", "exceptionally unlikely"]
    with pytest.raises(ValueError, match="probability"):
        likelihood(1.5)


def test_predict_structure(models):
    window = (0.5, 2.0)
    pred = models.predict(perovskite(), samples=16, level=0.8, window=window)
    b, e = pred.balora, pred.ensemble
    assert pred.draws.shape == (16,) and pred.draws.std() > 0 and not pred.error and pred.level == 0.8
    assert pred.window == window and set(b) == set(e) == {"band_gap", "std", "lower", "upper", "p_metal", "p_window"}
    assert b["band_gap"] == pytest.approx(pred.draws.mean(), abs=1e-9)  # the draws behind the row
    assert b["lower"] <= b["band_gap"] <= b["upper"] and e["lower"] <= e["band_gap"] <= e["upper"]
    for row, predictor in ((b, models.model), (e, models.ensemble)):  # every number as predict returns it
        direct = predictor.predict([perovskite()], samples=16, level=0.8, window=window).iloc[0]
        assert row == pytest.approx({k: float(direct[k]) for k in row}, abs=1e-6)
    assert "p_window" not in models.predict(perovskite(), samples=16, level=0.8).balora
    lone = Structure(Lattice.cubic(20.0), ["Si"], [[0, 0, 0]])
    assert "isolated_atom" in models.predict(lone, samples=4, level=0.9).error
    with pytest.raises(ValueError, match="window"):
        models.predict(perovskite(), samples=4, level=0.9, window=(2.0, 1.0))


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


def _prediction(gap, std, level=0.9, draws=(0.8, 1.0, 1.2), lower=None, upper=None):
    from matbalora import probabilities
    from matbalora.calibration import gaussian_interval

    lo, hi = (float(v) for v in gaussian_interval(gap, std, level))
    p_metal = float(probabilities.p_metal(np.asarray(draws)[:, None], [std])[0])
    return sup.Prediction({"band_gap": gap, "std": std, "lower": lo if lower is None else lower,
                           "upper": hi if upper is None else upper, "p_metal": p_metal},
                          {"band_gap": gap + 0.2, "std": std / 2, "lower": max(gap - std, 0.0), "upper": gap + std, "p_metal": 0.0},
                          np.array(draws), level)


def test_predictive_density_is_the_mixture_behind_p_metal_and_p_window(models):
    """The curve under the draws, with its mass at 0 eV, is the distribution ``predict``'s
    ``p_metal`` and ``p_window`` come from: its integrals over the metal band and the window are them."""
    from scipy.integrate import quad

    from matbalora.app.gaps import mass_at_zero, predictive_density
    from matbalora.defaults import METAL_THRESHOLD

    def mass(draws, std, lo, hi):
        return quad(lambda x: predictive_density(draws, std, np.array([x]))[0], lo, hi, limit=200)[0]

    window = (0.5, 1.5)
    pred = models.predict(perovskite(), samples=16, level=0.9, window=window)
    cases = [(pred.draws, pred.balora["std"], pred.balora["p_metal"], pred.balora["p_window"])]
    from matbalora import probabilities

    for draws, std in [([0.02, 0.05, 0.1], 0.35), ([2.0, 2.4, 1.8, 2.2], 0.6), ([6.0], 2.5)]:
        d = np.asarray(draws)[:, None]
        cases.append((draws, std, probabilities.p_metal(d, [std])[0], probabilities.p_window(d, [std], window)[0]))
    for draws, std, p_metal, p_window in cases:
        at_zero = mass_at_zero(draws, std)
        top = float(np.max(draws)) + 12 * std
        assert mass(draws, std, 0, top) + at_zero == pytest.approx(1.0, abs=1e-6)
        assert mass(draws, std, 0, METAL_THRESHOLD) + at_zero == pytest.approx(p_metal, abs=1e-6)
        assert mass(draws, std, *window) == pytest.approx(p_window, abs=1e-6)
    assert predictive_density([1.0], 0.5, np.array([-0.1]))[0] == 0.0
    assert np.isnan(predictive_density([0.0, 2.0], 0.1, np.array([1.0]))).all()  # std below the draws' spread: no density
    with pytest.raises(ValueError, match="std"):
        mass_at_zero([1.0], 0.0)


def test_figures():
    from matbalora.defaults import METAL_THRESHOLD

    pred = sup.Prediction({"band_gap": 1.0, "std": 0.2, "lower": 0.7, "upper": 1.4},
                          {"band_gap": 1.2, "std": 0.1, "lower": 1.0, "upper": 1.3}, np.array([0.8, 1.0, 1.2]), 0.9)
    fig = sup.interval_figure(pred)
    assert [t.y[0] for t in fig.data] == ["BaLoRA", "Deep ensemble (LoRA)"]
    assert fig.data[0].error_x.array[0] == pytest.approx(0.4) and fig.data[0].error_x.arrayminus[0] == pytest.approx(0.3)
    assert "90% intervals" in fig.layout.title.text
    assert list(fig.layout.yaxis.ticktext) == ["BaLoRA<br>1.00 eV [0.70, 1.40]", "Deep ensemble (LoRA)<br>1.20 eV [1.00, 1.30]"]
    cell = sup.cell_figure(perovskite())  # Sr on the 8 corners, Ti in the body, O on 6 face centres
    counts = {t.name: len(t.x) for t in cell.data if t.type == "scatter3d" and t.mode == "markers"}  # not the polyhedra
    assert counts == {"O": 6, "Sr": 8, "Ti": 1}
    assert np.isfinite(np.array(cell.data[-1].x, dtype=float)).sum() == 24  # 12 edges
    for figure in (fig, sup.samples_figure(pred)):  # the grey metal band is where p_metal counts a metal
        (band,) = figure.layout.shapes
        assert (band.x0, band.x1) == (0, METAL_THRESHOLD)
        assert f"metal (≤ {METAL_THRESHOLD:g} eV)" in figure.layout.annotations[0].text


def test_figures_draw_the_interval_predict_returned(models):
    """Both figures show ``lower``/``upper`` as ``predict`` returns them, here an asymmetric
    (conformal-like) interval that no Gaussian of ``std`` gives, and a real prediction's."""
    asymmetric = _prediction(1.0, 0.3, draws=[0.9, 1.0, 1.1], lower=0.41, upper=1.87)
    real = models.predict(perovskite(), samples=16, level=0.9, window=(1.0, 2.0))
    for pred in (asymmetric, real):
        b = pred.balora
        bar = sup.interval_figure(pred).data[0].error_x
        assert b["band_gap"] - bar.arrayminus[0] == pytest.approx(b["lower"], abs=1e-12)
        assert b["band_gap"] + bar.array[0] == pytest.approx(b["upper"], abs=1e-12)
        shaded = next(t for t in sup.samples_figure(pred).data if t.fill == "tozeroy")
        assert (min(shaded.x), max(shaded.x)) == (b["lower"], b["upper"])
        assert f"interval {b['lower']:.2f}–{b['upper']:.2f} eV" in shaded.name


@pytest.mark.parametrize(("gap", "std"), [(0.0, 0.35), (0.02, 0.33), (1.5, 0.8), (7.5, 1.9)])  # metals to wide gaps
def test_figures_keep_labels_off_the_data(gap, std):
    """No text annotation inside the plotting area (where metals and wide gaps put bars and curves):
    the numbers are tick labels and legend entries, the metal band's label sits above the axes."""
    pred = _prediction(gap, std, draws=gap + 0.03 * np.random.default_rng(0).standard_normal(16))
    for fig in (sup.interval_figure(pred), sup.samples_figure(pred)):
        for ann in fig.layout.annotations:
            assert ann.yref == "paper" and ann.y >= 1 and ann.yanchor == "bottom", ann.text
    hist = sup.samples_figure(pred)
    names = [t.name for t in hist.data]
    assert any(n.startswith("predictive density") for n in names) and names[-1].startswith("16 draws (Monte Carlo")
    four_heads = dataclasses.replace(pred, heads=4)  # a model with four gap heads: 4 draws of each
    assert sup.samples_figure(four_heads).layout.title.text.startswith("BaLoRA: 4 draws × 4 gap heads")
    assert hist.data[-1].yaxis == "y2" and hist.layout.legend.orientation == "h" and hist.layout.legend.y < 0
    b = pred.balora
    assert f"interval {b['lower']:.2f}–{b['upper']:.2f} eV" in " ".join(names)
    density = hist.data[0]
    assert min(density.x) == 0.0 and max(density.x) >= b["upper"]  # clipped at 0, reaches past the interval
    shaded = hist.data[1]
    assert min(shaded.x) >= b["lower"] and max(shaded.x) <= b["upper"]
    from matbalora.app.gaps import mass_at_zero

    assert any("P(gap = 0 eV)" in n for n in names) == (mass_at_zero(pred.draws, std) >= 0.005)


def test_batch_table(models):
    from matbalora.app.gaps import likelihood

    good = sup.example("Si (diamond)")
    window = (1.0, 2.0)
    pred = models.predict(good.structure, samples=8, level=0.9, window=window)
    bad = sup.Item("junk.cif", "junk", error="could not be read")
    table = sup.batch_table([(good, pred), (bad, None)], window=window)
    assert table["structure"].tolist() == ["Si", "junk"]
    for prefix, row in (("balora", pred.balora), ("ensemble", pred.ensemble)):  # the CSV holds predict's numbers
        for key in ("band_gap", "lower", "upper", "std", "p_metal", "p_window"):
            assert table.loc[0, f"{prefix}_{key}"] == row[key], (prefix, key)
    assert table.loc[0, "reading"] == sup.reading(pred.balora, level=0.9, window=window)
    assert table.loc[0, "reading"].startswith(f"{likelihood(pred.balora['p_metal'])} to be a metal")
    assert (table.loc[0, "window_lo"], table.loc[0, "window_hi"], table.loc[0, "level"]) == (1.0, 2.0, 0.9)
    assert table.loc[1, "message"] == "could not be read" and np.isnan(table.loc[1, "balora_p_window"])
    plain = sup.batch_table([(good, models.predict(good.structure, samples=8, level=0.9))])
    assert "balora_p_metal" in plain.columns and "balora_p_window" not in plain.columns and "window_lo" not in plain.columns
    with pytest.raises(ValueError, match="window"):
        sup.batch_table([(good, pred)], window=(0.0, 1.0))


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


def test_predict_items_is_bounded_and_survives_failures(monkeypatch):
    items = [sup.example("Si (diamond)"), sup.Item("x.cif", "x", error="could not be read"), sup.example("Cu (fcc metal)"),
             sup.example("NaCl (rock salt)")]
    clock = iter([0.0, 0.0, 1.0, 500.0])  # started, then one reading per readable item
    monkeypatch.setattr(predictions.time, "monotonic", lambda: next(clock))
    seen = []

    def predict(item):
        if item.id == "Cu":
            raise RuntimeError("boom")
        return sup.Prediction({"band_gap": 1.0}, {}, level=0.9)

    preds = sup.predict_items(items, predict, level=0.9, limits=sup.Limits(max_predict_seconds=10),
                              progress=lambda done, total: seen.append((done, total)))
    assert list(preds) == ["Si", "Cu", "NaCl"] and seen == [(1, 3), (2, 3), (3, 3)]
    assert not preds["Si"].error and "prediction failed: RuntimeError: boom" in preds["Cu"].error
    assert "prediction time (10 s) is used up" in preds["NaCl"].error


def test_app_and_cli_use_one_default_number_of_samples():
    import inspect

    from matbalora import cli, defaults
    from matbalora.predict import Predictor

    for argv in (["predict", "x.cif"], ["screen", "x.cif", "--out", "o.csv"], ["evaluate", "--data", "d", "--out", "o"]):
        args = cli.build_parser().parse_args(argv)
        assert (args.samples, args.level) == (defaults.SAMPLES, defaults.LEVEL), argv[0]
    signature = inspect.signature(Predictor.predict).parameters
    assert (signature["samples"].default, signature["level"].default) == (defaults.SAMPLES, defaults.LEVEL)
    for page in ("predict.py", "screen.py"):
        source = (sup.APP_SCRIPT.parent / "pages" / page).read_text()
        assert "SAMPLES, step=4" in source and "LEVEL, step=0.01" in source, page


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


def test_cli_app_hands_its_options_to_the_launcher(tmp_path, capsys):
    from matbalora import cli

    assert cli.main(["app", "--models", str(tmp_path), "--port", "8765"]) == 2  # argparse used to refuse "--models"
    assert "no balora or lora_ensemble model folder" in capsys.readouterr().err


def test_card_tables_with_and_without_non_metal_metrics():
    from matbalora.app import cards

    full = {"method": "balora", "metrics": {"test": {
        "mae": 0.4, "coverage_90": 0.9, "spearman": 0.7, "n": 10, "nonmetal_n": 6,
        "nonmetal_mae": 0.6, "nonmetal_coverage_90": 0.85, "nonmetal_spearman": 0.1, "train_seconds": 632.25},
        "val": {"mae": 9.9}}}
    table = cards.metrics_table(full)
    assert list(table.columns) == ["all crystals (n = 10)", "non-metals (n = 6)", "metals (n = 4, derived)"]
    assert table.loc["MAE (eV)"].tolist() == ["0.400", "0.600", "0.100"]  # (10 * 0.4 - 6 * 0.6) / 4
    assert table.loc["90% interval coverage"].tolist() == ["0.900", "0.850", "0.975"]
    assert table.loc["Spearman(|error|, std)"].tolist() == ["0.700", "0.100", "–"]  # not a mean: not derived
    assert "9.900" not in table.to_string() and cards.other_numbers(full) == {"train_seconds": "632.2"}
    plain = {"method": "lora", "metrics": {"test": {"mae": 0.5, "note": "tiny"}}}
    assert list(cards.metrics_table(plain).columns) == ["all crystals"]
    assert cards.metrics_table(plain).loc["MAE (eV)"].tolist() == ["0.500"]
    assert cards.metrics_table({"method": "head"}).empty


def test_recipe_reads_the_card(models):
    from matbalora.app import cards

    found = sup.model_cards(models.folder)
    recipe = cards.recipe_table(found["BaLoRA"])
    assert recipe["method"] == "balora" and recipe["backbone"].startswith("chgnet")
    assert recipe["Bayesian adapters"].startswith("yes") and "adapter rank / alpha" in recipe
    ens = cards.recipe_table(found["Deep ensemble"])
    assert ens["method"] == "lora" and ens["members"] == "2" and ens["Bayesian adapters"] == "no"
    assert ens["recalibration: scale k"] == "1"
    heads = {"method": "balora", "head": {"layers": 3, "hidden": 512, "output": "censored", "loss": "l1_nll", "gap_members": 5}}
    assert cards.recipe_table(heads)["head"] == "5 gap heads, each 3 layers x 512, censored output, l1_nll loss"
    bagged = heads | {"training": {"rehead": {"head_refit": {"bootstrap": True}}}}
    assert cards.recipe_table(bagged)["head"] == "5 bagged gap heads, each 3 layers x 512, censored output, l1_nll loss"
    assert cards.recipe_table({"method": "lora", "head": {"layers": 2, "hidden": 64}})["head"].startswith("2 layers x 64")
    # warm restarts and a refitted head: the card's totals, not its last run's, and the refit's own MAE
    restarted = {"method": "lora", "training": {"config": {"epochs": 1, "beta": 1.0}, "epochs_run": 1, "total_epochs": 4, "best_val_mae": 0.28,
                                                "rehead": {"head_refit": {"val_mae_after": 0.18}}}}
    recipe = cards.recipe_table(restarted)
    assert recipe["training: epochs (all runs)"] == "4" and "training: beta" not in recipe
    assert recipe["validation MAE after the gap-head refit (eV)"] == "0.18" and recipe["validation MAE of the adapter training (eV)"] == "0.28"


def test_plots_are_shown_only_for_the_model_that_made_them(tmp_path):
    import json

    from matbalora.app import cards

    results = tmp_path / "results" / "shipped"
    (results / "plots").mkdir(parents=True)
    shipped = {"mae": 0.40180147525, "coverage_90": 0.925, "n": 1000}
    other = {"mae": 0.457, "coverage_90": 0.926}
    plots = [f"{name}_{kind}.png" for name in ("balora", "shipped_one") for kind in ("parity", "calibration", "sparsification", "error_vs_std")]
    for name in plots:
        (results / "plots" / name).write_bytes(b"png")
    (results / "mp_gap.json").write_text(json.dumps({"methods": {"balora": other, "shipped_one": shipped}, "plots": plots}))
    card = {"metrics": {"test": shipped}}
    got = cards.card_plots(card, tmp_path / "results")
    assert [p.name for p, _ in got] == ["shipped_one_calibration.png", "shipped_one_parity.png", "shipped_one_sparsification.png"]
    assert all("method shipped_one, 1000 test crystals" in caption for _, caption in got)
    assert cards.card_plots({"metrics": {"test": {"mae": 0.40180147525, "coverage_90": 0.93}}}, tmp_path / "results") == []
    assert cards.card_plots({"metrics": {"test": {"mae": 0.40180147525}}}, tmp_path / "results") == []  # MAE alone is not enough
    assert cards.benchmark_method(card, tmp_path / "results")[1] == "shipped_one"


def test_card_intervals_come_from_the_results_file_that_scored_the_card(tmp_path):
    import json

    from matbalora.app import cards

    results = tmp_path / "results" / "full_pool"
    results.mkdir(parents=True)
    shipped = {"mae": 0.167, "coverage_90": 0.934, "n": 1000}
    intervals = {"balora": {"mae": {"value": 0.167, "low": 0.150, "high": 0.186},
                            "spearman": {"value": 0.842, "low": 0.815, "high": 0.868},
                            "nonmetal_spearman": {"value": 0.402, "low": "bad", "high": 0.474}},  # a broken entry is left out
                 "other": {"mae": {"value": 9.0, "low": 8.0, "high": 10.0}}}
    (results / "shipped.json").write_text(json.dumps({"methods": {"balora": shipped, "other": {"mae": 9.0, "coverage_90": 0.5}},
                                                     "intervals": intervals}))
    table = cards.card_intervals({"metrics": {"test": shipped}}, tmp_path / "results")
    assert table.to_dict("index") == {"MAE (eV)": {"value": "0.167", "95 % interval": "0.150 – 0.186"},
                                      "Spearman(|error|, std), all crystals": {"value": "0.842", "95 % interval": "0.815 – 0.868"}}
    assert cards.card_intervals({"metrics": {"test": {"mae": 0.3, "coverage_90": 0.9}}}, tmp_path / "results").empty  # no results file scored it
    (results / "shipped.json").write_text(json.dumps({"methods": {"balora": shipped}}))  # written before intervals existed
    assert cards.card_intervals({"metrics": {"test": shipped}}, tmp_path / "results").empty
