"""The documentation: the MkDocs site builds with every link and reference checked (``--strict``),
and no page (nor the README) names a file of the repository that does not exist."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level entries a page may name files under.
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {".ci"}
#: A path-like word: folders/file.ext or folder/ (inside code spans and link targets).
PATH = re.compile(r"(?<![\w./:-])(\.{0,2}/?[\w.-]+(?:/[\w.*-]+)*/[\w.*-]*)")
MAX_README_LINES = 250


def _names(text: str) -> list[str]:
    """Repository paths named in ``text``: inside `code spans`, code blocks' comments aside, and
    Markdown link targets."""
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text)
    found = []
    for span in spans:
        for m in PATH.finditer(span):
            word = m.group(1).rstrip(".,:;")
            first = word.split("/", 1)[0]
            if word.startswith("../"):
                found.append(word)  # outside the repository: never valid in a page
            elif first in TOP and "*" not in word:
                found.append(word)
    return found


def test_no_page_names_a_file_that_does_not_exist():
    missing = []
    for page in PAGES:
        base = ROOT if page.name == "README.md" else ROOT / "docs"
        for name in _names(page.read_text()):
            target = name.split("::")[0]
            in_repo = (ROOT / target).exists() or (base / target).exists()
            if target.startswith("../") or not in_repo:
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert missing == []
    # the check itself finds a stale name
    assert _names("see `dashboard/tables.py` and [x](../shared/DESIGN.md)") == ["dashboard/tables.py", "../shared/DESIGN.md"]


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"the README does not link {page.name}"


def test_the_site_builds_with_every_link_checked(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed: `pip install -e .[dev]` installs it")
        pytest.skip("mkdocs is not installed (pip install -e .[dev])")
    out = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr
    backends = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "from_options" in backends and "message channel" in backends  # the contract, from its docstring
    assert (tmp_path / "site" / "extending" / "index.html").is_file()
    shutil.rmtree(tmp_path / "site")
