"""A command run in a pseudo-terminal, as a user's terminal would show it (the tests of live views)."""
from __future__ import annotations

import os
import pty
import re
import subprocess


def run_in_terminal(argv: list[str], cwd, timeout: float = 300, columns: int = 160) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; returns its exit code and
    everything it wrote, escape sequences removed (every frame of a live display, in order)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
                            env={**os.environ, "COLUMNS": str(columns), "TERM": "xterm"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(leader)
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
