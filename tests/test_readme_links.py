"""Every relative link of the repository's Markdown files resolves in a clone: the target exists inside
the repository (no ``../shared``) and, in a git checkout, is tracked."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCS = ["README.md", "BENCHMARKS.md", "docs/BALORA.md", "data/mp_gap_sample/README.md"]


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^(https?:|mailto:|#)", t)]


def tracked() -> set[str] | None:
    if not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False)
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def test_link_pattern():
    assert relative_links("[a](docs/x.md) ![s](img.png) [w](https://x.org) [h](#top) [t](b.md#part)") == \
        ["docs/x.md", "img.png", "b.md#part"]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_in_a_clone(doc):
    path = REPO / doc
    if not path.is_file():
        pytest.skip(f"{doc} not in this checkout")
    files = tracked()
    for link in relative_links(path.read_text(encoding="utf-8")):
        target = (path.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(REPO), f"{doc}: {link} points outside the repository"
        assert target.exists(), f"{doc}: {link} does not exist"
        if files is not None and target.is_file():
            assert target.relative_to(REPO).as_posix() in files, f"{doc}: {link} is not committed"
