"""Screen correctness on tiny models: a finished screen is not recomputed, resumed rows keep their
error, a resume under other settings is refused, odd ids survive, one writer per output file."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import matbalora
from conftest import copper, perovskite, rocksalt_nacl, silicon
from matbalora.cli import main
from matbalora.screen_output import exclusive, lock_path, settings_path

ODD_IDS = ["a,b", "x\ny", "cr\rz", 'say "hi"', "NA", " padded ", "007", "x\r\ny", ""]


def _structures(ids: list[str]) -> list:
    base = [silicon(), rocksalt_nacl().get_primitive_structure(), copper().get_primitive_structure(), perovskite()]
    out = []
    for k, sid in enumerate(ids):
        s = base[k % len(base)].copy()
        s.properties = {"id": sid}
        out.append(s)
    return out


@pytest.fixture
def counted(shipped_like):
    """The tiny BaLoRA model, counting its forward passes."""
    model = matbalora.load_model()
    calls = {"n": 0}
    model.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return model, calls


@pytest.mark.parametrize("batch_size", [2, 64])  # 5 rows: a last partial chunk; one chunk smaller than the batch
def test_rerunning_a_finished_screen_does_nothing(counted, tmp_path, batch_size):
    model, calls = counted
    inputs, out = _structures([f"c{k}" for k in range(5)]), tmp_path / "s.csv"
    first = matbalora.screen(inputs, model=model, samples=2, batch_size=batch_size, out=out, progress=False)
    before, mtime, calls["n"] = out.read_bytes(), out.stat().st_mtime_ns, 0
    again = matbalora.screen(inputs, model=model, samples=2, batch_size=batch_size, out=out, progress=False)
    assert calls["n"] == 0 and out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(first, again, check_exact=False, atol=1e-12)
    assert not lock_path(out).exists()  # released and removed


def test_resume_inside_a_chunk_appends_only_the_missing_rows(counted, tmp_path):
    model, _ = counted
    inputs = _structures([f"c{k}" for k in range(7)])
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    matbalora.screen(inputs, model=model, samples=2, batch_size=3, out=full, progress=False)
    lines = full.read_bytes().split(b"\n")
    part.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:7])  # header, 4 rows (chunk 2 half done), torn 5th
    shutil.copy(settings_path(full), settings_path(part))
    resumed = matbalora.screen(inputs, model=model, samples=2, batch_size=3, out=part, progress=False)
    assert part.read_bytes() == full.read_bytes()
    assert resumed["id"].tolist() == [f"c{k}" for k in range(7)]


def test_resumed_rows_keep_their_error(shipped_like, tmp_path, capsys):
    from pymatgen.core import Lattice, Structure

    clash = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]], properties={"id": "clash"})
    inputs, out = [*_structures(["a", "b"]), clash], tmp_path / "s.csv"
    fresh = matbalora.screen(inputs, samples=2, batch_size=2, out=out, progress=False)
    again = matbalora.screen(inputs, samples=2, batch_size=2, out=out, progress=False)
    assert fresh["error"].tolist() == again["error"].tolist()
    assert again["error"].tolist()[:2] == ["", ""] and again["error"].tolist()[2].startswith("overlapping_atoms")
    assert again["n_atoms"].tolist() == [2, 2, 2] and str(again["n_atoms"].dtype) == "Int64"
    cif = tmp_path / "si.cif"
    silicon().to(filename=str(cif))
    args = ["screen", str(cif), str(cif.with_name("missing.cif")), "--samples", "2", "--out", str(tmp_path / "c.csv"), "--no-progress"]
    assert main(args) == 0 and main(args) == 0  # the second run resumes a finished screen
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(": 2 rows, 1 rejected (see the error column)")


@pytest.mark.parametrize(
    ("change", "named"),
    [({"samples": 3}, "samples=2 there, 3 now"), ({"level": 0.5}, "level=0.9 there, 0.5 now"), ({"seed": 1}, "seed"),
     ({"batch_size": 3}, "batch_size"), ({"ensemble": True}, "ensemble"), ({"model": "other"}, "model="), ({"order": True}, "order")],
)
def test_resume_with_other_settings_is_refused(shipped_like, tmp_path, change, named):
    inputs, out = _structures(["a", "b", "c"]), tmp_path / "s.csv"
    settings = {"samples": 2, "level": 0.9, "batch_size": 2}
    matbalora.screen(inputs[:2], **settings, out=out, progress=False)
    if change.get("model") == "other":
        other = tmp_path / "other"
        shutil.copytree(shipped_like / "balora", other)
        card = json.loads((other / "config.json").read_text())
        card["calibration"] = {"std_scale": 2.0}
        (other / "config.json").write_text(json.dumps(card))
        change = {"model": other}
    before = out.read_bytes()
    with pytest.raises(ValueError, match="other settings") as err:
        matbalora.screen(inputs, **{**settings, **change}, out=out, progress=False)
    assert named in str(err.value) and "new out file" in str(err.value)
    assert out.read_bytes() == before  # nothing mixed in


def test_every_recorded_setting_is_compared(shipped_like, tmp_path):
    """A setting a later version records (say ``window``) refuses a resume that differs in it; one the
    record lacks counts as None, so adding an off-by-default setting keeps old outputs resumable."""
    inputs, out = _structures(["a", "b"]), tmp_path / "s.csv"
    matbalora.screen(inputs[:1], samples=2, out=out, progress=False)
    record = json.loads(settings_path(out).read_text())
    settings_path(out).write_text(json.dumps({**record, "window": [1.0, 2.0]}))
    with pytest.raises(ValueError, match=r"window=\[1.0, 2.0\] there, none now"):
        matbalora.screen(inputs, samples=2, out=out, progress=False)
    settings_path(out).write_text(json.dumps({**record, "window": None}))
    assert len(matbalora.screen(inputs, samples=2, out=out, progress=False)) == 2


def test_ids_with_newlines_commas_and_quotes_survive_a_resume(shipped_like, tmp_path):
    inputs = _structures(ODD_IDS)
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    ref = matbalora.screen(inputs, samples=2, batch_size=4, out=full, progress=False)
    assert ref["id"].tolist() == ODD_IDS
    assert pd.read_csv(full, dtype={"id": str}, keep_default_na=False)["id"].tolist() == ODD_IDS
    data = full.read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 2):  # torn anywhere, also inside a quoted id
        part.write_bytes(data[:cut])
        shutil.copy(settings_path(full), settings_path(part))
        resumed = matbalora.screen(inputs, samples=2, batch_size=4, out=part, progress=False)
        assert part.read_bytes() == data, cut
        assert resumed["id"].tolist() == ODD_IDS
    again = matbalora.screen(inputs, samples=2, batch_size=4, out=part, progress=False)
    assert again["id"].tolist() == ODD_IDS and part.read_bytes() == data


def test_a_second_screen_on_the_same_out_is_refused(shipped_like, tmp_path, capsys):
    cif, out = tmp_path / "si.cif", tmp_path / "s.csv"
    silicon().to(filename=str(cif))
    with exclusive(out):  # as a running screen holds it
        assert main(["screen", str(cif), "--samples", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "being written by another screen" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["screen", str(cif), "--samples", "2", "--out", str(out), "--no-progress"]) == 0  # free again
