"""Pre-flight: what a run can check on the driver, checked before it writes anything.

A study or tuning is refused here, in seconds, with one message naming the spec field (or option)
and what to do, before ``.bnnctl/`` gets a row or the private Ray cluster starts: the run storage
is written and deleted once (with the driver's credentials), every checkpoint a config starts from
(``init_from``, ``distill.teacher``) is present and readable, and the resources asked for fit the
cluster (read without starting a worker) or this machine (for the private local cluster). Data roots
are checked beside this (``study.check_configs``). Workers check again what only they can see.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import SpecError
from .runcore import RunOptions, StorageNotShared, shared_storage_problem
from .spec import Checkpoint, Resources


def check_storage(opts: RunOptions, spec_file: str, source: str) -> None:
    from .runstorage import RunStorage, StorageError

    storage = RunStorage(opts.storage)
    try:
        storage.probe()
    except StorageError as err:  # the spec is read again for the field's line only when it failed
        line = _line(spec_file, source) if source == "storage" else None
        raise SpecError(spec_file, source, f"the run storage cannot be written from this machine: {err}. Give a "
                        "folder or URL this machine (and every node) can write, with its credentials", line) from None


def check_checkpoints(checkpoints: tuple[Checkpoint, ...]) -> None:
    """Every checkpoint a config starts from is there and readable (a URL: with this machine's
    credentials)."""
    for c in checkpoints:
        problem = _unreadable(c.path)
        if problem:
            raise SpecError(c.file, c.field, f"the checkpoint {c.path} {problem}. Give the path of a checkpoint a "
                            "run wrote (best.pt or last.pt; a relative path is relative to the folder the "
                            f"command runs in, the project folder{_beside_spec(c)}), or a URL of one in run "
                            "storage", c.line)


def _beside_spec(c: Checkpoint) -> str:
    """A hint when the path, read relative to the spec's folder instead, names a file."""
    if "://" in c.path:
        return ""
    rel = os.path.relpath(c.path)
    candidate = (Path(c.file).parent / rel).resolve()
    if rel.startswith("..") or candidate == Path(c.path) or not candidate.is_file():
        return ""
    return f", not the spec's folder: {candidate} is there; write that path, or run from {Path(c.file).parent.resolve()}"


def _unreadable(path: str) -> str:
    """'' when ``path`` can be read; else what is wrong with it."""
    if "://" in path:
        from .runstorage import RunStorage
        from .urls import mask_text

        try:
            storage = RunStorage(path.rsplit("/", 1)[0])
            return "" if storage.fs.exists(path) else "does not exist"
        except Exception as err:  # noqa: BLE001 - fsspec, s3fs, botocore...: one line
            return mask_text(f"cannot be read: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if not p.is_file():
        return "is not a file"
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return ""


def check_resources(opts: RunOptions, resources: Resources, parallel: int) -> RunOptions:
    """The backend checks the request against what it can see without starting workers; a cluster it
    joined for that is kept for the run (returned in the options)."""
    backend = opts.make_backend()
    backend.preflight(parallel, resources.cpus, resources.gpus, resources.workers)
    problem = shared_storage_problem(backend, opts)
    if problem:
        raise StorageNotShared(problem)
    return dataclasses.replace(opts, backend_instance=backend)


def preflight(spec, opts: RunOptions) -> RunOptions:
    """Every check above, in order of cost, on resolved options (:meth:`RunOptions.resolve`);
    returns the options the run goes on with."""
    from .backends import ResourceError

    assert opts.resolved, "preflight checks resolved options"
    check_checkpoints(spec.checkpoints)
    check_storage(opts, spec.file, opts.storage_source)
    try:  # last: it may join a cluster (kept for the run)
        return check_resources(opts, spec.resources, opts.max_parallel or spec.execution.max_parallel)
    except ResourceError as err:
        raise SpecError(spec.file, "resources", str(err), _line(spec.file, "resources")) from None


def _line(spec_file: str, path: str) -> int | None:
    from .spec import load_yaml

    try:
        return load_yaml(Path(spec_file))[1].get(path)
    except Exception:  # noqa: BLE001 - the spec was read a moment ago; its line is a detail
        return None
