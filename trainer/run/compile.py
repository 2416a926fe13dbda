"""trainer.compile: the compile warm-up. torch.compile compiles a graph the first time it meets a new
input shape or a new set of trained parameters; left alone it would do so inside training's time (the
first step, the last batch's smaller size, the epoch an unfreeze or fastnet's whitening bias changes what
trains). The warm-up runs each of those once before training, outside its timing, and puts back the
weights, statistics, gradients and random state, so the run is the one it would have been."""

import itertools

import torch

from trainer.core.errors import UserError
from trainer.run.devices import autocast
from trainer.tasks.base import move, take


def warm_up(trainer) -> None:  # noqa: ANN001 - trainer.run.loop.Trainer (which imports this module's users)
    s, progress, plan = trainer.s, trainer.progress, trainer.plan
    saved, rng = {k: v.clone() for k, v in s.plain.state_dict().items()}, torch.get_rng_state()
    sampler = s.loaders.sampler
    shares, rank = sampler.plan, sampler.rank
    sizes = {len(shares.share(0, rank)), len(shares.share(len(shares) - 1, rank))}
    first = move(next(iter(s.loaders.train)), s.device, plan.channels_last)
    epochs = sorted({progress.epoch, max(plan.max_epochs - 1, progress.epoch)})
    try:
        for epoch, size in itertools.product(epochs, sorted(sizes)):  # a real batch's samples, to each size
            batch = take(first, torch.arange(size) % s.task.count(first))
            s.train_mode(epoch, quiet=True)
            trainer.forward_backward(batch)
            with torch.no_grad(), autocast(s.device, plan.autocast_dtype):
                s.model.eval()(s.task.inputs(batch))
    except Exception as e:  # the compiler's own failure (no C++ compiler, an unsupported op...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"trainer.compile: torch.compile failed here ({type(e).__name__}: {first_line}); set "
            "trainer.compile=false"
        ) from e
    finally:
        s.optimizer.zero_grad(set_to_none=True)
        s.plain.load_state_dict(saved)
        torch.set_rng_state(rng)
