"""Input semantics of the API and the CLI: one ASE Atoms is one crystal, the README's columns are
the CLI's, n_atoms is an integer, a missing path is one line, --version, --help shows defaults."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from ase.build import bulk

import matbalora
from conftest import REPO, silicon
from matbalora.cli import main

EXAMPLES = REPO / "data" / "examples"


def test_a_single_ase_atoms_is_one_crystal(shipped_like):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms
    df = matbalora.load_model().predict(atoms, samples=2)
    assert len(df) == 1 and df["n_atoms"].tolist() == [8] and df["error"].tolist() == [""]
    assert len(matbalora.load_ensemble().predict(atoms)) == 1
    assert len(matbalora.screen(atoms, samples=2, progress=False)) == 1


def _readme_columns() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    sentence = re.search(r"Output columns \(eV\): (.+?)\. ", text, re.S).group(1)
    return re.findall(r"`([a-z_]+)`", sentence.replace("`, `", "`\n`"))


def test_readme_columns_are_the_columns_the_cli_writes(shipped_like, tmp_path):
    out, ens = tmp_path / "p.csv", tmp_path / "e.csv"
    assert main(["predict", str(EXAMPLES / "Si_diamond.cif"), "--samples", "2", "--out", str(out)]) == 0
    assert main(["predict", str(EXAMPLES / "Si_diamond.cif"), "--samples", "2", "--ensemble", "--out", str(ens)]) == 0
    written, with_ens = list(pd.read_csv(out).columns), list(pd.read_csv(ens).columns)
    promised = _readme_columns()
    assert {"error", "std_aleatoric", "note", "warning"} <= set(promised)
    assert promised == with_ens and written == [c for c in with_ens if not c.startswith("ens_")]
    screened = matbalora.screen([EXAMPLES / "Si_diamond.cif"], samples=2, out=tmp_path / "s.csv", progress=False)
    assert list(pd.read_csv(tmp_path / "s.csv").columns) == written == list(screened.columns)


def test_n_atoms_is_an_integer(shipped_like, tmp_path):
    from pymatgen.core import Lattice, Structure

    empty = Structure(Lattice.cubic(4.0), [], [])
    assert str(matbalora.load_model().predict([silicon()], samples=0)["n_atoms"].dtype) == "int64"
    frame = matbalora.screen([silicon(), empty, tmp_path / "missing.cif"], samples=0, out=tmp_path / "s.csv", progress=False)
    assert str(frame["n_atoms"].dtype) == "Int64" and frame["n_atoms"].tolist()[0] == 2
    row = (tmp_path / "s.csv").read_text().splitlines()[1]
    assert ',2,' in row  # written as 2, not 2.0
    out = tmp_path / "p.csv"
    main(["predict", str(EXAMPLES / "Si_diamond.cif"), "--samples", "0", "--out", str(out)])
    assert pd.read_csv(out)["n_atoms"].dtype.kind == "i"


def test_a_missing_path_is_one_clear_line(shipped_like, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.cif"), "--samples", "2"]) == 1
    captured = capsys.readouterr()
    assert "Empty DataFrame" not in captured.out and captured.out.strip() == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: ") and "nope.cif" in line and ("no such file" in line or "does not exist" in line)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"matbalora {matbalora.__version__}"


@pytest.mark.parametrize(
    ("command", "expected"),
    [("predict", ["--samples SAMPLES", "(default: 16)", "(default: 0.9)"]), ("screen", ["(default: 256)", "(default: 16)", "(default: 2)"]),
     ("train", ["(default: balora)", "(default: 0.1)", "(default: chgnet)"]), ("evaluate", ["(default: 16)"])],
)
def test_help_shows_defaults(command, expected, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for snippet in expected:
        assert snippet in text, snippet
    assert "(default: (default" not in text and text.count("(default:") >= 4
