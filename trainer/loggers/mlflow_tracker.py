"""`logger=mlflow`: the run in MLflow, through its own client (the `mlflow` extra) against
`logger.mlflow.tracking_uri`: an SQLite database (the default, `sqlite:///mlflow.db` in the working
directory), a local folder, or a tracking server. A resumed run continues the same MLflow run."""

import logging
import time
from pathlib import Path
from typing import Any

from trainer.core.registry import LOGGERS
from trainer.loggers.base import Logger, flatten, require_library

log = logging.getLogger("trainer")


@LOGGERS.register("mlflow")
class MLflow(Logger):
    name, rewinds, needs = "mlflow", False, ("mlflow", "mlflow")

    def __init__(
        self,
        *,
        run_dir: Path,
        resume_step: int | None,
        state: dict[str, Any],
        config: dict[str, Any],
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
        artifacts: bool,
        artifact_location: str | None,
    ) -> None:
        require_library(MLflow)
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database migrations talk at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client, self.keep_artifacts = MlflowClient(tracking_uri=tracking_uri), artifacts
        self.run_id = state.get("run_id")
        if self.run_id:  # resumed: the same run, running again
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )  # None: MLflow's own, ./mlruns in the working directory
        self.run_id = self.client.create_run(
            experiment_id, run_name=run_name or run_dir.name, tags={"run_dir": str(run_dir.resolve())}
        ).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first : first + 100])

    def write(self, metrics: dict[str, float], step: int, at: int | None = None) -> None:
        from mlflow.entities import Metric

        at = at or int(time.time() * 1000)  # a point sent again carries its first time: MLflow keeps one
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), at, step) for k, v in metrics.items()]
        )

    def artifacts(self, run_dir: Path) -> None:
        if not self.keep_artifacts:
            return
        if (run_dir / "export").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "export"), "export")
        if (run_dir / "checkpoints" / "best.pt").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "checkpoints" / "best.pt"), "checkpoints")

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
