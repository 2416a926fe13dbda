"""The training loss as it runs: summed on the device (no host sync per step) with the sample count,
and the last few losses kept, so a periodic check that finds the sum non-finite can name the exact
step."""

import torch
from torch import Tensor

from trainer.core.distributed import all_reduce


class RunningLoss:
    def __init__(
        self, device: torch.device, window: int = 1, loss_sum: float = 0.0, samples: int = 0
    ) -> None:
        """`loss_sum` and `samples`: where a resumed epoch starts from (the whole job's, on one process)."""
        self.loss_sum = torch.tensor(float(loss_sum), device=device)
        self.samples = samples
        self.recent = torch.zeros(window, device=device)
        self.recent_steps = [0] * window
        self.count = 0

    def add(self, loss: Tensor, samples: int, step: int) -> None:
        """`loss`: the batch's mean loss (a device scalar), over `samples` samples."""
        loss = loss.detach()
        self.loss_sum.add_(loss, alpha=samples)
        slot = self.count % len(self.recent)
        self.recent[slot] = loss
        self.recent_steps[slot] = step
        self.count += 1
        self.samples += samples

    def totals(self) -> tuple[float, int]:
        """(loss sum, samples) over every process; a host synchronisation."""
        sums = all_reduce(
            torch.stack([self.loss_sum, torch.tensor(float(self.samples), device=self.loss_sum.device)])
        )
        loss_sum, samples = sums.tolist()
        return loss_sum, int(samples)

    def mean(self) -> float:
        loss_sum, samples = self.totals()
        return loss_sum / max(samples, 1)

    def first_nonfinite_step(self) -> int | None:
        """The step of the first non-finite loss since the sum was last finite, over all processes (they
        agree, so they stop together); a host synchronisation."""
        step = self._first_bad_step() if not bool(self.loss_sum.isfinite()) else None
        missing = float(2**53)
        found = all_reduce(
            torch.tensor([float(step) if step is not None else missing], device=self.loss_sum.device), "min"
        ).item()
        return None if found >= missing else int(found)

    def _first_bad_step(self) -> int:
        window = min(self.count, len(self.recent))
        slots = [(self.count - window + i) % len(self.recent) for i in range(window)]
        bad = (~self.recent.isfinite()).tolist()
        return next(
            (self.recent_steps[s] for s in slots if bad[s]), self.recent_steps[slots[0]] if slots else 0
        )
