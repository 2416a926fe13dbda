"""Fine-tuning: `finetune.freeze` (parameter-name patterns) keeps parts of a model fixed until
`finetune.unfreeze_at_epoch`. Frozen parameters stay in the optimizer: with no gradient they are not
stepped (nor decayed) and have no optimizer state until they train, so the state after the unfreeze
epoch is the same whether or not a run was resumed in between. BatchNorm layers whose parameters are
all frozen keep their running statistics (eval mode) while frozen."""

import fnmatch
import logging

from torch import nn

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


class Freezer:
    def __init__(self, model: nn.Module, patterns: list[str], unfreeze_at_epoch: int) -> None:
        self.unfreeze_at_epoch = unfreeze_at_epoch
        named = dict(model.named_parameters())
        self.frozen = [
            p for name, p in named.items() if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        ]
        if patterns and not self.frozen:
            raise UserError(
                f"finetune.freeze: no parameter matches {list(patterns)}; the names look like "
                f"{', '.join(list(named)[:4])} (patterns are shell-style: 'layer1.*')"
            )
        ids = {id(p) for p in self.frozen}
        self.norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(True for _ in m.parameters())
            and all(id(p) in ids for p in m.parameters())
        ]
        self.active: bool | None = None
        if self.frozen:
            log.info(
                "finetune.freeze: %d of %d parameter tensors fixed%s",
                len(self.frozen),
                len(named),
                f" until epoch {unfreeze_at_epoch}" if unfreeze_at_epoch else "",
            )

    def frozen_in(self, epoch: int) -> bool:
        """Whether the patterns hold in `epoch` (0-based, as Progress counts)."""
        return bool(self.frozen) and (self.unfreeze_at_epoch == 0 or epoch + 1 < self.unfreeze_at_epoch)

    def apply(self, epoch: int, quiet: bool = False) -> None:
        """Called after model.train() at each epoch's start: the gradients and norms of `epoch`
        (`quiet`: for the compile warm-up, which visits the last epoch's state before training)."""
        active = self.frozen_in(epoch)
        if active != self.active:
            for p in self.frozen:
                p.requires_grad_(not active)
            if self.active is not None and not active and not quiet:
                log.info("finetune.freeze: epoch %d, every parameter trains from now on", epoch + 1)
            self.active = active
        if active:
            for norm in self.norms:
                norm.eval()
