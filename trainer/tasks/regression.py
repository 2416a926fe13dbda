"""`task=regression`: one or several float targets per sample; MSE, L1 or Huber (`task.loss`); metrics
MAE, RMSE and R² (each the mean over targets, in the targets' own units).

Targets are standardised with the training split's mean and standard deviation (`task.standardize`):
the model learns z-scores, the statistics are saved in every checkpoint and the export manifest, and
the exported model undoes the standardisation, so predictions come back in the user's units."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import TASKS
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
class Regression(Task):
    name, target, monitor = "regression", "values", "rmse"
    metrics = {"loss": "min", "mae": "min", "rmse": "min", "r2": "max"}
    train_metrics = {"mae": "min"}

    def __init__(
        self, loss: str = "mse", huber_delta: float = 1.0, standardize: bool = True, tta: str = "none"
    ) -> None:
        super().__init__(tta)
        if loss not in LOSSES:
            raise UserError(f"task.loss: must be one of {', '.join(LOSSES)}, got {loss!r}")
        if huber_delta <= 0:
            raise UserError(f"task.huber_delta: must be positive, got {huber_delta}")
        self.loss_name, self.huber_delta, self.standardize = loss, huber_delta, standardize
        self.mean: list[float] = []
        self.std: list[float] = []
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def train_sums_size(self) -> int:  # type: ignore[override]
        return len(self.classes)  # absolute errors per target

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
                f"task=regression: training target {row} of {data.name} is NaN or infinite; fix or "
                f"drop that sample"
            )
        if self.standardize:
            std = targets.std(0, unbiased=False) if len(targets) > 1 else torch.ones(targets.shape[1])
            self.mean, self.std = targets.mean(0).tolist(), std.where(std > 0, torch.ones_like(std)).tolist()
        else:
            self.mean, self.std = [0.0] * targets.shape[1], [1.0] * targets.shape[1]

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim not in (1, 2) or outputs.reshape(len(outputs), -1).shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] values (one per target)"
        return None

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

    def _errors(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(predictions, targets) in the targets' units, float32."""
        outputs = outputs.detach().float()
        mean, std = self._stats(outputs.device)
        return outputs * std + mean, self._values(batch, outputs)

    def train_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        predicted, actual = self._errors(outputs, batch)
        return (predicted - actual).abs().sum(0)

    def from_train_sums(self, sums: list[float], count: int) -> dict[str, float]:
        return {"mae": sum(sums) / max(len(sums), 1) / max(count, 1)}

    def eval_sums_size(self) -> int:
        return 2 + 4 * len(self.classes)  # loss, samples; per target: |error|, error², y, y²

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        predicted, actual = self._errors(outputs, batch)
        loss = self.loss(outputs.float(), batch) * len(actual)
        error = (predicted - actual).double()
        actual = actual.double()
        n = torch.tensor([float(len(actual))], device=outputs.device, dtype=torch.float64)
        return torch.cat(
            [
                loss.double().view(1),
                n,
                error.abs().sum(0),
                (error**2).sum(0),
                actual.sum(0),
                (actual**2).sum(0),
            ]
        )

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        loss, count = sums[0], max(sums[1], 1)
        absolute, squared, total, total_sq = torch.tensor(sums[2:], dtype=torch.float64).view(4, -1)
        variance = total_sq - total**2 / count  # n x the targets' variance
        r2 = 1 - squared / variance.where(variance > 0, torch.nan)
        return {
            "loss": loss / count,
            "mae": float((absolute / count).mean()),
            "rmse": float((squared / count).sqrt().mean()),
            "r2": float(r2.nanmean()) if bool(r2.isfinite().any()) else 0.0,
        }

    def exported(self, model: nn.Module) -> nn.Module:
        return Unstandardize(model, self.mean, self.std)

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """`outputs` come from the export, already in the targets' units."""
        return [
            {"values": dict(zip(self.classes, row))}
            for row in outputs.float().reshape(len(outputs), -1).tolist()
        ]
