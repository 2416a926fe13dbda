"""`task=regression`: one or several float targets per sample; MSE, L1 or Huber (`task.loss`); metrics
MAE, RMSE and R² (each the mean over targets, in the targets' own units; torchmetrics).

Targets are standardised with the training split's mean and standard deviation (`task.standardize`):
the model learns z-scores, the statistics are saved in every checkpoint and the export manifest, and
the exported model undoes the standardisation, so predictions come back in the user's units."""

from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.fields import POSITIVE, one_of
from trainer.core.registry import TASKS
from trainer.tasks.abilities import Answers, ExportWrapper, TestTimeAugmentation
from trainer.tasks.base import Batch, DataInfo, Task

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


class Unstandardize(nn.Module):
    """The model's outputs in the targets' units: z * std + mean (buffers, so every export holds them)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.std + self.mean


@TASKS.register("regression")
class Regression(Task, Answers, ExportWrapper, TestTimeAugmentation):
    target, monitor = "values", "rmse"

    def __init__(
        self,
        *,
        loss: Annotated[str, one_of(*LOSSES)],
        huber_delta: Annotated[float, POSITIVE],
        standardize: bool,
        tta: str,
    ) -> None:
        super().__init__()
        self.tta = self.check_tta(tta)
        self.loss_name, self.huber_delta, self.standardize = loss, huber_delta, standardize
        self.mean: list[float] = []
        self.std: list[float] = []
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        if data.train_targets is None:
            raise UserError(
                f"task=regression: {data.name} cannot list its training targets (a split's targets()), "
                f"which the standardisation needs; add it, or set task.standardize=false"
            )
        targets = data.train_targets.double().reshape(len(data.train_targets), -1)
        if targets.shape[1] != len(self.classes):
            raise UserError(
                f"task=regression: {data.name} names {len(self.classes)} targets but its samples hold "
                f"{targets.shape[1]}"
            )
        if not bool(targets.isfinite().all()):
            row = int((~targets.isfinite()).any(1).nonzero()[0])
            raise UserError(
                f"task=regression: training target {row} of {data.name} is NaN or infinite; fix or drop "
                "that sample"
            )
        if self.standardize:
            std = targets.std(0, unbiased=False) if len(targets) > 1 else torch.ones(targets.shape[1])
            self.mean, self.std = targets.mean(0).tolist(), std.where(std > 0, torch.ones_like(std)).tolist()
        else:
            self.mean, self.std = [0.0] * targets.shape[1], [1.0] * targets.shape[1]

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.mean, self.std = list(state["mean"]), list(state["std"])
            self._on.clear()

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
        return self._on[device]

    def _values(self, batch: Batch, like: Tensor) -> Tensor:
        return self.targets(batch).to(like.dtype).reshape(len(like), -1)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        mean, std = self._stats(outputs.device)
        z = (self._values(batch, outputs) - mean.to(outputs.dtype)) / std.to(outputs.dtype)
        if self.loss_name == "huber":
            return F.huber_loss(outputs, z, delta=self.huber_delta)
        return LOSSES[self.loss_name](outputs, z)

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.regression import MeanAbsoluteError, R2Score

        from trainer.tasks.metrics import TargetsRMSE

        targets = len(self.classes) or 1
        return {
            "mae": MeanAbsoluteError(),
            "rmse": TargetsRMSE(squared=False, num_outputs=targets),
            "r2": R2Score(multioutput="uniform_average"),
        }

    def train_metrics(self) -> dict[str, Any]:
        from trainer.tasks.metrics import MeanAbsoluteError

        return {"mae": MeanAbsoluteError()}

    def update(self, metrics: Mapping[str, Any], outputs: Tensor, batch: Batch) -> None:
        """The metrics see predictions and targets in the targets' units, in float64."""
        outputs = outputs.double().reshape(len(outputs), -1)
        mean, std = self._stats(outputs.device)
        predicted, actual = outputs * std.double() + mean.double(), self._values(batch, outputs)
        for metric in metrics.values():
            metric.update(
                predicted.squeeze(1) if predicted.shape[1] == 1 else predicted,
                actual.squeeze(1) if actual.shape[1] == 1 else actual,
            )

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim not in (1, 2) or outputs.reshape(len(outputs), -1).shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] values (one per target)"
        return None

    def exported(self, model: nn.Module) -> nn.Module:
        return Unstandardize(model, self.mean, self.std)

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """`outputs` come from the export, already in the targets' units."""
        return [
            {"values": dict(zip(self.classes, row))}
            for row in outputs.float().reshape(len(outputs), -1).tolist()
        ]
