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
from pathlib import Path
from typing import Any

MAX_PARAM_LENGTH = 500  # MLflow accepts longer values, but the UI's table does not


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


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"model": {"arch": "hourglass"}} -> {"model.arch": "hourglass"} (lists as JSON)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . space : / in metric names ("pckh@0.1" -> "pckh_at_0.1")."""
    return name.replace("@", "_at_")


class Tracker:
    def __init__(self, uri: str | None, experiment: str, storage=None) -> None:
        """``storage``: the RunStorage that results' file locations are relative to (artifacts are
        read from it, downloaded first when it is a URL)."""
        from mlflow.tracking import MlflowClient

        from .runstorage import RunStorage

        self.storage = storage or RunStorage()
        self.uri = uri or default_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location(self.uri))

    def _alive(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted or from another store
            return False

    def study_run(self, name: str, existing: str | None, spec_file: str) -> str:
        if self._alive(existing):
            self.client.update_run(existing, status="RUNNING")
            return existing  # type: ignore[return-value]
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"bnnctl.study": name,
                                                                                "bnnctl.spec_file": spec_file})
        return run.info.run_id

    def variant_run(self, parent: str, existing: str | None, key: str, label: str, kind: str, seed: int,
                    config: dict, study: str) -> str:
        if self._alive(existing):
            self.client.update_run(existing, status="RUNNING")
            return existing  # type: ignore[return-value]
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": parent, "bnnctl.study": study, "bnnctl.variant": key,
                "bnnctl.identity": key, "bnnctl.kind": kind, "bnnctl.seed": str(seed), "bnnctl.label": label}
        run = self.client.create_run(self.experiment_id, run_name=label, tags=tags)
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(metric_name(k), float(v), ts, epoch) for k, v in metrics.items()])

    def finish(self, run_id: str, result: dict | None, error: str | None = None, stopped: bool = False) -> None:
        """Final metrics and artifacts of a finished run; a run stopped early (a pruned trial) keeps
        its metrics and ends KILLED; a failed run keeps its reason as a tag and ends FAILED."""
        if result is not None and stopped:
            self.client.set_tag(run_id, "bnnctl.state", "stopped")
            self.client.set_terminated(run_id, "KILLED")
        elif result is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            final = {f"final.{k}": v for k, v in result["metrics"].items()}
            final.update({f"accounting.{k}": v for k, v in result["accounting"].items()})
            final["best." + result["metric"]] = result["best_metric"]
            self.client.log_batch(run_id, metrics=[Metric(metric_name(k), float(v), ts, result["epochs_done"])
                                                   for k, v in final.items()])
            with tempfile.TemporaryDirectory() as tmp:
                summary = Path(tmp) / "result.json"
                summary.write_text(json.dumps(result, indent=2, default=str))
                self.client.log_artifact(run_id, str(summary))
                if result.get("per_joint"):
                    table = Path(tmp) / "per_joint.csv"
                    table.write_text("joint,value\n" + "".join(f"{k},{v:.3f}\n" for k, v in result["per_joint"].items()))
                    self.client.log_artifact(run_id, str(table))
            from .runstorage import resolve

            image = resolve(self.storage, result.get("predictions_image"))
            if image is not None:
                self.client.log_artifact(run_id, str(image))
            ckpt = resolve(self.storage, result.get("best_checkpoint"))
            if ckpt is not None:
                self.client.log_artifact(run_id, str(ckpt), artifact_path="checkpoint")
            self.client.set_terminated(run_id, "FINISHED")
        else:
            if error:
                self.client.set_tag(run_id, "bnnctl.error", error[:5000])
            self.client.set_terminated(run_id, "FAILED")

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
