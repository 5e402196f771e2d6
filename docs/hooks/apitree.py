"""MkDocs hook: the installed package's layout for mkdocstrings.

The project's folders are installed as sub-packages of ``bnnctl`` (pyproject's
``[tool.setuptools.package-dir]``: ``workers/`` is ``bnnctl.workers``, ...), which a static reader
cannot see from the repository. This hook lays that mapping out as symbolic links under
``build/apidoc/bnnctl`` at start-up (before any plugin reads its configuration), read from
pyproject itself, and mkdocs.yml points mkdocstrings there.
"""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "build" / "apidoc"


def on_startup(command, dirty, **kwargs):
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in sorted(mapping.items()):
        target = TREE.joinpath(*package.split("."))
        target.parent.mkdir(parents=True, exist_ok=True)
        if package == "bnnctl":  # the top-level package's own files, beside the sub-packages' links
            target.mkdir(parents=True, exist_ok=True)
            for f in (ROOT / folder).iterdir():
                if f.suffix == ".py":
                    (target / f.name).symlink_to(f)
        else:
            target.symlink_to(ROOT / folder, target_is_directory=True)
