"""MLflow tracking of a run: the only server module that imports MLflow (artifact downloads: common.mlflow_artifacts).

Default store: a SQLite file in the run's output folder (``mlflow.db``) with artifacts next to it
(``mlartifacts/``), so nothing has to be started. Open it with the command :func:`ui_hint` returns.
Only configuration, counts and metrics keyed by site name are logged: no patient values exist on
the server to log.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from common.mlflow_artifacts import download_artifact

__all__ = ["Tracker", "download_artifact", "library_versions", "ui_hint"]

log = logging.getLogger("fedsite.server")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for dist in ("flwr", "torch", "monai", "numpy", "pydicom", "SimpleITK", "opacus", "mlflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def ui_hint(tracking_uri: str) -> str:
    """The command that opens this store in the MLflow UI."""
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class Tracker:
    """Logs one federated run to MLflow; every call is best effort and never stops training.

    Args:
        out_dir: The run's output folder (holds the default store).
        tracking_uri: An MLflow tracking URI, or ``""`` for the local SQLite store.
        experiment: Experiment name.
        run_name: Name of the MLflow run.
        resume_run_id: Continue this MLflow run (a resumed federation) instead of creating one; if it
            is not in the store, a new run is created.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        tracking_uri: str = "",
        experiment: str = "fedsite",
        run_name: str = "",
        resume_run_id: str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.tracking_uri = tracking_uri or f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}"
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self.resume_run_id = resume_run_id
        self._client: Any = None
        self._starting: threading.Thread | None = None

    def start(self, params: Mapping[str, Any], *, background: bool = True) -> None:
        """Create the run and log ``params`` (and library versions).

        Opening the store takes seconds (importing MLflow, creating the SQLite schema); with
        ``background`` it happens in a thread while the first round runs, and every later call
        waits for it.
        """
        if background:
            self._starting = threading.Thread(
                target=self._start, args=(dict(params),), name="mlflow-start", daemon=True
            )
            self._starting.start()
        else:
            self._start(params)

    def _ready(self) -> bool:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        return self._client is not None and self.run_id is not None

    def fetch(self, uri: str) -> Path:
        """Download the artifact ``uri`` from this tracker's store (see :func:`download_artifact`)."""
        return download_artifact(uri, self.tracking_uri)

    def wait(self) -> str | None:
        """Wait for the store to be open; returns the MLflow run id (None if tracking is off)."""
        self._ready()
        return self.run_id

    def _start(self, params: Mapping[str, Any]) -> None:
        import warnings

        warnings.filterwarnings("ignore", module="mlflow")  # SQLAlchemy deprecation notes from MLflow's store
        try:
            from mlflow.tracking import MlflowClient

            for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                artifacts = None
                if self.tracking_uri.startswith("sqlite:"):
                    artifacts = (self.out_dir / "mlartifacts").resolve().as_uri()
                exp_id = self._client.create_experiment(self.experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            if self.resume_run_id:
                try:
                    self._client.update_run(self.resume_run_id, status="RUNNING")
                    self.run_id = self.resume_run_id
                    return  # its parameters were logged when it started
                except Exception as exc:
                    log.warning("MLflow: run %s cannot be continued (%s); starting a new one", self.resume_run_id, exc)
            run = self._client.create_run(exp_id, run_name=self.run_name or None)
            self.run_id = run.info.run_id
            flat = {k: str(v) for k, v in params.items()}
            flat.update({f"version.{k}": v for k, v in library_versions().items()})
            items = list(flat.items())
            for i in range(0, len(items), 90):
                from mlflow.entities import Param

                self._client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
        except Exception as exc:  # tracking must never stop a federation
            log.warning("MLflow tracking disabled: %s", exc)
            self._client = None

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Log numeric metrics at ``step`` (the round)."""
        if not self._ready():
            return
        try:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            for i in range(0, len(batch), 900):
                self._client.log_batch(self.run_id, metrics=batch[i : i + 900])
        except Exception as exc:
            log.warning("MLflow: could not log metrics for round %d: %s", step, exc)

    def log_artifact(self, path: Path) -> None:
        """Attach a file (the final model, results.json) to the run."""
        if not self._ready():
            return
        try:
            self._client.log_artifact(self.run_id, str(path))
        except Exception as exc:
            log.warning("MLflow: could not store artifact %s: %s", Path(path).name, exc)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED`` or ``FAILED``)."""
        if not self._ready():
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("MLflow: could not close the run: %s", exc)
