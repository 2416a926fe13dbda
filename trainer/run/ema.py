"""An exponential moving average of the weights (the `ema` config section), evaluated, tested and exported
in place of the trained weights when on."""

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """An exponential moving average of a model's parameters and floating-point buffers, kept as a
    module of its own to evaluate, test and export. Updated with foreach kernels on the device and
    no host synchronisation (torch's AveragedModel compares a device counter on the host each update).

    `power` > 0 ramps the decay up over training, `decay * (step / total_steps) ** power`: early weights
    are soon forgotten, late ones averaged over more steps (the speed record's schedule, power 3).
    `lookahead`: after each update the model itself continues from the average (Lookahead: the fast
    weights are pulled back to the slow ones), as the speed record does; without it the average only
    watches."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        every: int,
        power: float = 0.0,
        total_steps: int = 1,
        lookahead: bool = False,
    ) -> None:
        self.decay, self.every, self.power, self.lookahead = decay, every, power, lookahead
        self.total_steps = total_steps
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ours = [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]
        theirs = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        return ours, theirs

    def decay_at(self, step: int) -> float:
        return self.decay * min(step / self.total_steps, 1.0) ** self.power if self.power else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            ours, theirs = self._pairs(model)
            torch._foreach_lerp_(ours, theirs, 1 - self.decay_at(step))
            if self.lookahead:
                torch._foreach_copy_(theirs, ours)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average over from the model's current weights (after a data-dependent init)."""
        self.module.load_state_dict(model.state_dict())
