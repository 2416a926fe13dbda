"""Where training stands, as a dataclass with state_dict(): with the tensors, everything a resumed run
needs to continue exactly. And the error that stops a run whose loss or weights stopped being finite."""

from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.core.errors import UserError

NONFINITE_CAUSES = (
    "Likely causes: a learning rate too high (lower optimizer.lr, add scheduler warmup or "
    "trainer.gradient_clip_val), or float16 overflow (use trainer.precision=bf16 or 32); "
    "trainer.on_nonfinite=skip_batch skips such batches instead"
)


@dataclass
class Progress:
    """Where training stands; everything a resumed run needs besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batches_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch checkpoints)
    epoch_loss: tuple[float, int] = (0.0, 0)  # the current epoch's loss sum and samples so far
    epoch_metrics: dict[str, Any] = field(default_factory=dict)  # its training metrics' states so far
    best: float | None = None  # best value of the monitored metric so far
    best_epoch: int = 0
    samples_trained: int = 0
    units_trained: int = 0  # in the task's unit (images, tokens)
    train_time_s: float = 0.0
    skipped_batches: int = 0  # non-finite losses skipped with trainer.on_nonfinite=skip_batch
    schedule_start: int = 0  # the step the learning-rate schedule counts from (moved by reset_scheduler)
    metrics: dict[str, float] = field(default_factory=dict)  # the last epoch's report
    profiled: bool = field(default=False, compare=False)  # trainer.profile's trace is taken once per process

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state.pop("profiled")
        state["epoch_loss"] = list(self.epoch_loss)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.epoch_loss = tuple(self.epoch_loss)


class NonFiniteLoss(UserError):
    """Training produced NaN or Inf; raised before anything non-finite reaches a checkpoint."""
