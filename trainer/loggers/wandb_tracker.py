"""`logger=wandb`: the run in Weights & Biases (the `wandb` extra), offline by default: the run's
wandb/ folder holds it, and `wandb sync <run dir>/wandb/offline-run-*` uploads it later (`mode: online`
sends it at once). A resumed run continues the same W&B run id."""

import os
import secrets
from pathlib import Path
from typing import Any

from trainer.core.registry import LOGGERS
from trainer.loggers.base import Logger, require_library


@LOGGERS.register("wandb")
class WandB(Logger):
    name, rewinds, needs = "wandb", False, ("wandb", "wandb")

    def __init__(
        self,
        *,
        run_dir: Path,
        resume_step: int | None,
        state: dict[str, Any],
        config: dict[str, Any],
        project: str,
        entity: str | None,
        mode: str,
        name: str | None,
        artifacts: bool,
    ) -> None:
        wandb = require_library(WandB)
        self.keep_artifacts = artifacts
        self.id = state.get("id") or secrets.token_hex(4)  # W&B ids: 8 of [a-z0-9]
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would interleave with our log
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            id=self.id,
            resume="allow",
            name=name or run_dir.name,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def write(self, metrics: dict[str, float], step: int, at: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        self.run.summary.update(final)

    def artifacts(self, run_dir: Path) -> None:
        if not self.keep_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.id}", type="model")
        if (run_dir / "export").is_dir():
            artifact.add_dir(str(run_dir / "export"), name="export")
        if (run_dir / "checkpoints" / "best.pt").is_file():
            artifact.add_file(str(run_dir / "checkpoints" / "best.pt"), name="checkpoints/best.pt")
        self.run.log_artifact(artifact)

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.id}

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
