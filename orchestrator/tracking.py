"""MLflow tracking with the explicit client: one parent run per study, one child run per variant.

Runs are created once and their ids kept in the state store, so running a study again never
duplicates runs (a resumed variant continues its run). Default store: sqlite under ``.bnnctl/``
(MLflow 3 refuses the old ./mlruns file store); ``--tracking-uri`` for a server.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bnnctl.workers.errors import BnnctlError

from .layouts import split_name

MAX_PARAM_LENGTH = 500  # MLflow accepts longer values, but the UI's table does not
#: MLflow 3's UI opens an experiment by this tag's kind: without it, on its GenAI overview (traces,
#: evaluations); "custom_model_development" opens on the training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def version_tags(study: str) -> dict[str, str]:
    """The ``bnnctl.version`` tag of a run of a study version (``NAME@VERSION``), with the spec's
    name; none for the spec as written."""
    name, version = split_name(study)
    return {"bnnctl.version": version, "bnnctl.spec_name": name} if version else {}


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store under ./.bnnctl as an absolute path (MLflow caches
    stores by URI within a process, so a relative path would follow the first working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path('.bnnctl') / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store (``.bnnctl/mlartifacts``,
    never ``./mlruns`` of whatever folder the command ran in); a tracking server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def ui_hint(uri: str | None) -> str:
    """Where to look at the runs: the server's own URL, or `mlflow ui` over a local store (masked)."""
    from .urls import mask_url

    uri = uri or default_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {mask_url(uri)} (the MLflow tracking server)"
    return f"mlflow ui --backend-store-uri {mask_url(uri)}"


_SCALARS = frozenset({str, int, float, bool, type(None)})


def flatten_values(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"arch": "hourglass"}} -> {"model.arch": "hourglass"}, values keeping their types
    (lists as tuples, so that a DataFrame cell is hashable)."""
    out: dict[str, Any] = {}

    def walk(node: dict, at: str) -> None:  # one call per section, not per value (results() of 10,000 variants)
        for k, v in node.items():
            kind = type(v)  # JSON's own types first: exact type tests are the cheap ones
            if kind in _SCALARS:
                out[f"{at}{k}"] = v
            elif kind is dict or (kind is not list and isinstance(v, dict)):
                walk(v, f"{at}{k}.")
            else:
                out[f"{at}{k}"] = tuple(v) if kind is list or isinstance(v, list) else v

    if isinstance(data, dict):
        walk(data, f"{prefix}." if prefix else "")
    else:
        out[prefix] = tuple(data) if isinstance(data, list) else data
    return out


def flatten(data: Any) -> dict[str, str]:
    """The same as text, as MLflow params and the pages show it (lists as JSON)."""
    return {k: json.dumps(v) if isinstance(v, tuple) else str(v) for k, v in flatten_values(data).items()}


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . space : / in metric names ("pckh@0.1" -> "pckh_at_0.1")."""
    return name.replace("@", "_at_")


@contextmanager
def _creation_lock(uri: str):
    """An exclusive lock beside a sqlite tracking store while it is opened (created and migrated on
    first use: MLflow's migrations are not safe when two processes run them at once)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def params_of(config: dict) -> list:
    """A config as MLflow params (flattened, values cut to what the UI's table shows)."""
    from mlflow.entities import Param

    return [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in sorted(flatten(config).items())]


def metrics_of(epoch: int, metrics: dict[str, float]) -> list:
    """An epoch's metrics as MLflow metrics (step: the epoch)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(metric_name(k), float(v), ts, epoch) for k, v in metrics.items()]


class TrackingError(BnnctlError):
    """The tracking store cannot be used as it is (one message: what it holds and what to do)."""


def _run_count(path: Path) -> int | None:
    """How many runs a sqlite MLflow store holds (0: no runs table yet; None: not a database)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError as err:
        return 0 if "no such table" in str(err) else None
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()


def _forget_engine(uri: str) -> None:
    """Close MLflow's cached engine of ``uri`` (its pooled connections keep the file they opened)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


def _create_store(path: Path) -> None:
    """A new sqlite MLflow store, created and migrated under a temporary name, then published under
    ``path`` at once (a hard link: never over a store another process published meanwhile). A
    kill at any moment leaves either no store or a complete one, never a half-migrated file."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for stale in path.parent.glob(path.name + ".creating-*"):  # a killed creator's (we hold the lock)
        stale.unlink(missing_ok=True)
    temp = path.with_name(f"{path.name}.creating-{os.getpid()}")
    uri = f"sqlite:///{temp}"
    try:
        SqlAlchemyStore(uri, artifact_location(f"sqlite:///{path}"))
        _forget_engine(uri)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        _forget_engine(uri)
        for leftover in (temp, Path(f"{temp}-journal"), Path(f"{temp}-wal"), Path(f"{temp}-shm")):
            leftover.unlink(missing_ok=True)


def _open_client(uri: str):
    """MLflow's client of ``uri``. A new sqlite store is created atomically (see
    :func:`_create_store`); one that a killed first run left half-created (it cannot be opened and
    holds no runs: an older bnnctl migrated it in place) is created again, with a one-line notice; one
    that holds runs is never touched: its error becomes one message saying what to do."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return MlflowClient(tracking_uri=uri)
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() and path.stat().st_size == 0:  # an empty file (touched, or opened by sqlite): no store yet
        path.unlink()
    if not path.exists():
        _create_store(path)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens (and verifies) the store
        return client
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a store it cannot use
        runs = _run_count(path)
        if runs != 0:
            held = "is not an SQLite database" if runs is None else f"holds {runs} runs"
            cause = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise TrackingError(
                f"the MLflow store {path} cannot be opened ({cause[:300]}); it {held}, so bnnctl leaves it as it "
                f"is. If an older MLflow wrote it, upgrade it: mlflow db upgrade sqlite:///{path}; otherwise move "
                f"it aside (mv {path} {path}.bak) and run again to start a new one, or run with --no-track"
            ) from None
    import sys

    print(f"bnnctl: the MLflow store {path} was left half-created by an interrupted first run and held no runs; "
          "created it again", file=sys.stderr)
    _forget_engine(uri)
    path.unlink()
    _create_store(path)
    return MlflowClient(tracking_uri=uri)


class Tracker:
    def __init__(self, uri: str | None, experiment: str, storage=None) -> None:
        """``storage``: the RunStorage that results' file locations are relative to (artifacts are
        read from it, downloaded first when it is a URL)."""
        from .runstorage import RunStorage

        self.storage = storage or RunStorage()
        self.uri = uri or default_uri()
        self.recovered = False  # see study_run
        if not os.environ.get("BNNCTL_VERBOSE"):  # MLflow's INFO lines about its own tables: --verbose shows them
            import logging

            import mlflow  # noqa: F401 - its import sets its loggers' levels: set ours after it

            logging.getLogger("mlflow").setLevel(logging.WARNING)
        with _creation_lock(self.uri):  # two drivers creating one sqlite store would corrupt it
            self.client = _open_client(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=artifact_location(self.uri))
                except Exception:  # noqa: BLE001 - created meanwhile by another process (a server store)
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            if exp is not None:
                self.experiment_id = exp.experiment_id
            if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    def _alive(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted or from another store
            return False

    def _find(self, **tags: str) -> str | None:
        """The oldest live run of this experiment with these tags: one a killed driver created but
        never recorded in the state store (it is reused, never duplicated)."""
        if any("'" in v or "\\" in v for v in tags.values()):  # not expressible in a filter string
            return None
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())  # values: names and hex keys
        runs = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def study_run(self, name: str, existing: str | None, spec_file: str) -> str:
        """The study's parent run: the one the store names, else one found by its tags (the store
        lost it: :attr:`recovered` is then True, and its variants' runs are found by :meth:`children`),
        else a new one."""
        self.recovered = False
        if not self._alive(existing):
            existing = self._find(**{"bnnctl.study": name, "bnnctl.role": "study"})
            self.recovered = existing is not None
        if existing is not None:
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "bnnctl.study": name, "bnnctl.role": "study", "bnnctl.spec_file": spec_file, **version_tags(name)})
        return run.info.run_id

    def variant_run(self, parent: str, existing: str | None, key: str, label: str, kind: str, seed: int,
                    config: dict, study: str, tags: dict[str, str] | None = None) -> str:
        """The variant's run: created once (params: the flattened config; tags: its place and
        provenance, see ``Executor.provenance``), reopened when the variant runs again. ``existing``:
        the run the store names (:data:`CREATING`: a creation a killed driver may have finished;
        None: never created)."""
        run_id, created = self.open_variant_run(parent, existing, key, label, kind, seed, config, study, tags)
        if created:
            self._log_params(run_id, config)
        return run_id

    def open_variant_run(self, parent: str, existing: str | None, key: str, label: str, kind: str, seed: int,
                         config: dict, study: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
        """:meth:`variant_run` without a new run's params (its caller sends them with its first
        batch); returns (the run id, whether it was created now)."""
        extra = dict(tags or {})
        # a run that may exist: the store names it, or names a creation a killed driver did not finish
        found = existing if self._alive(existing) else \
            self._find(**{"bnnctl.variant": key}) if existing is not None else None
        if found is not None:
            if not self._reopen(found).data.params:  # created, then its driver died before its params
                self._log_params(found, config)
            self._tag(found, extra)
            return found, False
        base = {"mlflow.parentRunId": parent, "bnnctl.study": study, "bnnctl.variant": key,
                "bnnctl.identity": key, "bnnctl.kind": kind, "bnnctl.seed": str(seed), "bnnctl.label": label,
                **version_tags(study)}
        version = base.get("bnnctl.version")  # the versions of a study share its experiment: names tell them apart
        run = self.client.create_run(self.experiment_id, run_name=f"{label} @{version}" if version else label,
                                     tags={**base, **extra})
        return run.info.run_id, True

    def children(self, parent: str) -> dict[str, str]:
        """Variant key -> run id of a parent run's live children, oldest first wins (paged: one query
        per 1,000 runs). Read once by a driver whose state store lost the runs' ids (a deleted or
        replaced database), so that it continues those runs instead of creating second ones."""
        found: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                           max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
            for run in page:
                key = run.data.tags.get("bnnctl.variant")
                if key and key not in found:
                    found[key] = run.info.run_id
            token = page.token
            if not token:
                return found

    def link_runs(self, parent: str, study: str, links: list[dict]) -> int:
        """A run under the study's ``parent`` for each row whose variant's run is not one of its own
        rows: a result reused from another study or a tuning (``tune best``'s study), or a row that is
        the same function as a teacher (one identity, one run, tagged ``kind=teacher``). So every row
        of the table is a run of the study's experiment, with the study's tags, the variant's final
        metrics and params, and ``bnnctl.same_as_run`` naming the run that trained it. ``links``:
        ``{"key", "run", "ablation", "row", "seed", "label", "metrics", "epoch", "config"}`` each;
        a link already there (same row and variant) is kept. Returns the links created."""
        from mlflow.entities import RunTag

        have: set[tuple[str, str, str, str]] = set()
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token,
                                           filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                                                         "tags.`bnnctl.role` = 'link'")
            for run in page:
                t = run.data.tags
                have.add((t.get("bnnctl.same_as", ""), t.get("bnnctl.ablation", ""), t.get("bnnctl.row", ""),
                          t.get("bnnctl.seed", "")))
            token = page.token
            if not token:
                break
        made = 0
        vtags = version_tags(study)
        for link in links:
            if (link["key"], link["ablation"], link["row"], str(link["seed"])) in have:
                continue
            name = f"{link['ablation']} / {link['row']} / seed {link['seed']}"
            tags = {"mlflow.parentRunId": parent, "bnnctl.study": study, "bnnctl.role": "link", "bnnctl.kind": "row",
                    "bnnctl.ablation": link["ablation"], "bnnctl.row": link["row"], "bnnctl.seed": str(link["seed"]),
                    "bnnctl.label": name, "bnnctl.same_as": link["key"], "bnnctl.same_as_run": link["run"] or "",
                    "bnnctl.same_as_label": link["label"], **vtags}
            version = vtags.get("bnnctl.version")
            run = self.client.create_run(self.experiment_id, run_name=f"{name} @{version}" if version else name,
                                         tags={k: v for k, v in tags.items() if v})
            self.log_batches(run.info.run_id, metrics_of(link["epoch"], link["metrics"]), params_of(link["config"]),
                             [RunTag("mlflow.note.content", f"The same variant as run {link['run']} "
                                     f"({link['label']}); trained once, reused by this row.")])
            self.client.set_terminated(run.info.run_id, "FINISHED")
            made += 1
        return made

    def _tag(self, run_id: str, tags: dict[str, str]) -> None:
        if tags:
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def study_files(self, run_id: str, spec_file: str | None, files: dict[str, str]) -> None:
        """The study's parent run keeps its spec and its final tables (``files``: name -> text)."""
        with tempfile.TemporaryDirectory() as tmp:
            if spec_file and Path(spec_file).is_file():
                self.client.log_artifact(run_id, spec_file, artifact_path="spec")
            for name, text in files.items():
                target = Path(tmp) / name
                target.write_text(text)
                self.client.log_artifact(run_id, str(target), artifact_path="tables")

    def _reopen(self, run_id: str):
        """A resumed variant's run: RUNNING again, without the mark of its interruption."""
        self.client.update_run(run_id, status="RUNNING")
        run = self.client.get_run(run_id)
        if run.data.tags.get("bnnctl.state") == "interrupted":
            self.client.delete_tag(run_id, "bnnctl.state")
        return run

    def _log_params(self, run_id: str, config: dict) -> None:
        self.log_batches(run_id, [], params_of(config), [])

    def log_metrics(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        self.log_batches(run_id, metrics_of(epoch, metrics), [], [])

    def finish(self, run_id: str, result: dict | None, error: str | None = None, stopped: bool = False,
               pending: tuple[list, list] = ([], []), fresh: bool = False) -> None:
        """Final metrics and artifacts of a finished run; a run stopped early (a pruned trial) keeps
        its metrics and ends KILLED; a failed run keeps its reason as a tag and ends FAILED.

        ``pending``: (metrics, params) not written yet, written in the same batch; ``fresh``: a run
        created by this driver (no earlier attempt's error tag to clear). The checkpoints stay in the
        run storage (one copy): the run's ``bnnctl.checkpoint`` tag says where the best one is."""
        from mlflow.entities import Metric, RunTag

        metrics, params = list(pending[0]), list(pending[1])
        tags: list = []
        if result is not None and stopped:
            tags.append(RunTag("bnnctl.state", "stopped"))
        elif result is not None:
            ts = int(time.time() * 1000)
            final = {f"final.{k}": v for k, v in result["metrics"].items()}
            final.update({f"accounting.{k}": v for k, v in result["accounting"].items()})
            final.update({f"latency.{k}": v for k, v in (result.get("latency") or {}).items()
                          if k in ("binary_ms", "float_ms", "speedup") and v is not None})
            final["best." + result["metric"]] = result["best_metric"]
            metrics += [Metric(metric_name(k), float(v), ts, result["epochs_done"]) for k, v in final.items()]
            for name, field_ in (("bnnctl.checkpoint", "best_checkpoint"), ("bnnctl.checkpoint_last", "last_checkpoint")):
                if result.get(field_):
                    where = result[field_]
                    tags.append(RunTag(name, where if os.path.isabs(where) or "://" in where
                                       else self.storage.location(where)))
        elif error:
            tags.append(RunTag("bnnctl.error", error[:5000]))
        self.log_batches(run_id, metrics, params, tags)
        if result is not None and not stopped:
            self._artifacts(run_id, result)
            if not fresh and "bnnctl.error" in self.client.get_run(run_id).data.tags:  # an earlier attempt's
                self.client.delete_tag(run_id, "bnnctl.error")
        self.client.set_terminated(run_id, "KILLED" if stopped else "FINISHED" if result is not None else "FAILED")

    def _artifacts(self, run_id: str, result: dict) -> None:
        """The result's summary, per-joint table and predictions image, in one upload."""
        import shutil

        from .runstorage import resolve

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "result.json").write_text(json.dumps(result, indent=2, default=str))
            if result.get("per_joint"):
                (Path(tmp) / "per_joint.csv").write_text(
                    "joint,value\n" + "".join(f"{k},{'' if v is None else f'{v:.3f}'}\n"
                                              for k, v in result["per_joint"].items()))
            image = resolve(self.storage, result.get("predictions_image"))
            if image is not None:
                shutil.copyfile(image, Path(tmp) / image.name)
            self.client.log_artifacts(run_id, tmp)

    def log_batches(self, run_id: str, metrics: list, params: list, tags: list) -> None:
        """Everything in as few ``log_batch`` calls as MLflow's limits allow (100 params, 100 tags,
        1000 items per call)."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            p, t = params[:100], tags[:100]
            m = metrics[:1000 - len(p) - len(t)]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]

    def reconcile(self, variants) -> dict[str, int]:
        """Bring MLflow in line with the state store after a driver died: the RUNNING runs of
        variants that finished get their final metrics, artifacts and status (the store is written
        first, MLflow after); those of variants that will resume end KILLED until they start again.
        ``variants``: the store's Variant records. Returns how many runs were ended, by status."""
        done: dict[str, int] = {}
        for v in variants:
            if not v.mlflow_run_id or not self._alive(v.mlflow_run_id):
                continue
            run = self.client.get_run(v.mlflow_run_id)
            if run.info.status != "RUNNING":
                if v.status == "completed" and "bnnctl.error" in run.data.tags:
                    self.client.delete_tag(v.mlflow_run_id, "bnnctl.error")
                continue
            if v.status == "completed":
                self.finish(v.mlflow_run_id, v.result)
            elif v.status == "stopped":
                self.finish(v.mlflow_run_id, v.result or {}, stopped=True)
            elif v.status == "failed":
                self.finish(v.mlflow_run_id, None, v.error)
            elif v.status == "running":  # a live driver's (another study sharing it); a dead one's resumes
                continue
            else:  # pending: its driver died while it ran; it resumes (and runs again) later
                self.interrupted(v.mlflow_run_id)
            done[v.status] = done.get(v.status, 0) + 1
        return done

    def interrupted(self, run_id: str) -> None:
        """The variant stopped before its end (cancelled, or its driver died); it resumes later and
        its run turns RUNNING again then."""
        self.client.set_tag(run_id, "bnnctl.state", "interrupted")
        self.client.set_terminated(run_id, "KILLED")

    def trial_started(self, run_id: str, arm: str, number: int, params: dict[str, Any]) -> None:
        """Mark a variant's run as an Optuna trial: trial number and sampled values as tags, and the
        sampled values as ``trial.<path>`` params (the config params hold them under their paths too)."""
        from mlflow.entities import Param, RunTag

        tags = [RunTag("bnnctl.trial", str(number)), RunTag("bnnctl.arm", arm), RunTag("bnnctl.trial_state", "RUNNING")]
        try:
            self.client.log_batch(run_id, params=[Param("trial.number", str(number))]
                                  + [Param(f"trial.{k}", str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())],
                                  tags=tags)
        except Exception:  # the run is shared with an earlier trial (same config): params are immutable
            self.client.log_batch(run_id, tags=tags)

    def trial_finished(self, run_id: str, state: str, objective: float | None) -> None:
        from mlflow.entities import Metric

        self.client.set_tag(run_id, "bnnctl.trial_state", state)
        if objective is not None:
            self.client.log_batch(run_id, metrics=[Metric("objective", float(objective), int(time.time() * 1000), 0)])

    def end_study(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, {"completed": "FINISHED", "cancelled": "KILLED", "stopped": "KILLED"}.get(status, "FAILED"))


#: what the store holds as a variant's MLflow run while its creation is under way: a driver killed
#: then leaves it, and the next one looks for the run by its tags instead of creating a second one
CREATING = "creating"
