"""Publishing a generated dataset folder atomically, safe when two processes generate it at once."""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def read_manifest(path: Path):
    """The JSON manifest at ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def publish(tmp: Path, root: Path, same: Callable[[], bool]) -> None:
    """Move the finished folder ``tmp`` to ``root``. When another process published the same set
    first (two tasks preparing the embedded data at once), keep theirs and drop ours."""
    try:
        os.replace(tmp, root)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not same():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
