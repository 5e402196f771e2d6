"""``study submit`` / ``tune submit``: the driver runs on the cluster as a Ray job.

The laptop ships the spec in the job's runtime environment (its ``working_dir``), starts
``bnnctl study run`` there through Ray's Job Submission API, and from then on follows the study
through the state database (``study status``, ``study show``) and the job server (``study logs``,
``study cancel``). Nothing needs to stay open on the laptop.

- The job's submission id is derived from the study (``bnnctl-study-<name>-<n>``, n counting earlier
  submissions), and the study's row remembers the job server and the id. A study whose job is
  still pending or running is not submitted again: the message names the running job.
- The state database, the run storage and the MLflow tracking store must be reachable from the
  cluster: a sqlite file, a local storage folder or a local tracking store of this machine are
  refused (``file://`` names a shared folder explicitly). The database URL travels in the job's
  environment, never on its command line.
"""
from __future__ import annotations

import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnnctl.workers.errors import BnnctlError

from .runstorage import is_url
from .store import Store, default_url
from .urls import mask_url

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(BnnctlError):
    """The study cannot be submitted (or its job reached); the message says why and what to do."""


@dataclass(frozen=True)
class Submitted:
    study: str
    job_id: str
    address: str


def client(address: str):
    """A JobSubmissionClient for the job server at ``address`` (http://HEAD:8265), with one clear
    message when it cannot be reached. Token authentication is added by Ray when RAY_AUTH_MODE=token."""
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)  # "Uploading package ..." chatter
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address}: a study is submitted to the cluster's job server, "
                          "http://HEAD:8265 (the Ray dashboard's address)")
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        raise SubmitError(f"cannot reach the Ray job server at {mask_url(address)}: "
                          f"{str(err).strip().splitlines()[0][:300]}") from None


def check_reachable(db: str, storage: str, tracking_uri: str | None, track: bool) -> None:
    """Refuse what the cluster could not reach."""
    if db.startswith("sqlite"):
        raise SubmitError(f"--db {mask_url(db)}: a submitted study needs a state database the cluster can reach "
                          "and this machine can read back, e.g. --db postgresql+psycopg://user:password@host/db "
                          "(or $BNNCTL_DB); a sqlite file stays on one machine")
    if not (is_url(storage) or storage.startswith("file://")):
        raise SubmitError(f"--storage {storage}: a submitted study needs run storage every node reaches: "
                          "s3://bucket/prefix, gs://..., or file:///shared/folder for a folder every node mounts")
    if track and not (tracking_uri or "").startswith(("http://", "https://", "postgresql", "mysql")):
        raise SubmitError("--tracking-uri: a submitted study logs to an MLflow tracking server the cluster reaches "
                          "(e.g. --tracking-uri http://mlflow-host:5000), or pass --no-track")


def _jobs_of(c, name: str) -> list:
    return sorted((j for j in c.list_jobs() if (j.metadata or {}).get("bnnctl_study") == name),
                  key=lambda j: j.start_time or 0)


def submit(spec_path: Path, kind: str, address: str, db: str | None, storage: str | None,
           tracking_uri: str | None, track: bool, max_parallel: int | None = None,
           overrides: tuple[tuple[str, Any], ...] = (), tag: str | None = None) -> Submitted:
    """Submit the study (``kind="study"``) or tuning in ``spec_path`` as a Ray job; a study with
    ``overrides`` (``--set``) or a ``tag`` is submitted as that version (``NAME@VERSION``)."""
    if kind == "study":
        from .spec import load_spec
        from .study import table_layout

        spec = load_spec(spec_path, dict(overrides), tag)
        layout = table_layout(spec)
    else:
        from .tunespec import load_tune_spec
        from .tuning import tuning_layout

        spec = load_tune_spec(spec_path)
        layout = tuning_layout(spec)
    db = db or default_url()
    from .runcore import RunOptions

    storage = RunOptions.resolve(spec, RunOptions(storage=storage)).storage or ""  # --storage, spec, environment
    check_reachable(db, storage, tracking_uri, track)
    c = client(address)
    jobs = _jobs_of(c, spec.name)
    active = [j for j in jobs if j.status.value not in TERMINAL]
    if active:
        raise SubmitError(f"{kind} {spec.name} is already running as job {active[-1].submission_id} on "
                          f"{mask_url(address)}; follow it with `bnnctl study logs {spec.name}` or stop it with "
                          f"`bnnctl study cancel {spec.name}`")
    job_id = f"bnnctl-{kind}-{spec.name}-{len(jobs) + 1}"
    store = Store(db)
    row = store.upsert_study(spec.name, str(spec_path), spec.spec_hash, layout)
    args = [kind if kind == "study" else "tune", "run", spec_path.name, "--storage", storage]
    args += ["--tracking-uri", tracking_uri] if track and tracking_uri else ["--no-track"]
    if max_parallel:
        args += ["--max-parallel", str(max_parallel)]
    for path, value in overrides:  # the same version in the job: its overrides as the job's --set
        args += ["--set", f"{path}={set_text(value)}"]
    if tag is not None:
        args += ["--tag", tag]
    entrypoint = "python -m bnnctl.orchestrator.cli " + " ".join(shlex.quote(a) for a in args)
    with tempfile.TemporaryDirectory(prefix="bnnctl-submit-") as ship:
        (Path(ship) / spec_path.name).write_bytes(spec_path.read_bytes())
        try:
            c.submit_job(entrypoint=entrypoint, submission_id=job_id, metadata={"bnnctl_study": spec.name},
                         runtime_env={"working_dir": ship, "env_vars": {"BNNCTL_DB": db, "PYTHONUNBUFFERED": "1",
                                                                          "BNNCTL_JOB": job_id}})
        except Exception as err:  # noqa: BLE001 - the job server's refusal, as one message
            raise SubmitError(f"the job server at {mask_url(address)} refused the job: "
                              f"{str(err).strip().splitlines()[0][:500]}") from None
    store.annotate_study(row.id, job={"address": address, "id": job_id, "submitted": time.time()})
    return Submitted(spec.name, job_id, address)


def set_text(value: Any) -> str:
    """``value`` as ``--set PATH=TEXT`` text that reads back as the same value (JSON is YAML)."""
    import json

    from .yamlio import parse_value

    if isinstance(value, str) and parse_value(value) == value:
        return value
    return json.dumps(value)


def job_of(study, address: str | None) -> tuple[Any, str] | None:
    """(client, job id) of a study's last submitted job, or None when it was never submitted."""
    job = study.layout.job
    if not job:
        return None
    return client(address or job["address"]), job["id"]


def follow_logs(study, address: str | None, out, poll: float = 1.0, follow: bool = True) -> str:
    """Print the job's output as it grows (until the job ends, with ``follow``); returns its status."""
    found = job_of(study, address)
    if found is None:
        raise SubmitError(f"{study.name} was not submitted as a job (`bnnctl study submit`); its driver printed "
                          "its output where it ran")
    c, job_id = found
    shown = 0
    while True:
        status = c.get_job_status(job_id).value
        logs = c.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:])
            shown = len(logs)
        if status in TERMINAL or not follow:
            return status
        time.sleep(poll)


#: what a cancelled submitted driver prints once it has said everything: its job may be stopped
AWAITING_STOP = "bnnctl: the driver is done; the job server stops this job"


def stop_job(study, address: str | None, grace: float = 30.0, released=lambda: False) -> str | None:
    """Stop the study's job: the driver has ``grace`` seconds to stop its variants by itself (after
    the study was marked cancelled); once it has (``released()``: it let the study go) or the grace is
    over, the job server stops the job, which ends STOPPED (a cancelled driver waits for that, see
    ``cli.study``; having let the study go, it has another ``grace`` to print its last words). Returns the job's final status (None: no job)."""
    found = job_of(study, address)
    if found is None:
        return None
    c, job_id = found
    deadline = time.monotonic() + grace
    let_go = False
    while time.monotonic() < deadline and not let_go:
        status = c.get_job_status(job_id).value
        if status in TERMINAL:
            return status
        let_go = released()
        if not let_go:
            time.sleep(0.5)
    # once it let the study go, the driver prints its last words, then waits for the stop (see
    # cli.study.await_job_stop): stopped before that, its log would end without them
    deadline = time.monotonic() + grace
    while let_go and time.monotonic() < deadline and c.get_job_status(job_id).value not in TERMINAL \
            and AWAITING_STOP not in c.get_job_logs(job_id)[-4096:]:
        time.sleep(0.5)
    c.stop_job(job_id)
    while (status := c.get_job_status(job_id).value) not in TERMINAL:
        time.sleep(0.5)
    return status
