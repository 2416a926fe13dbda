"""Which device a run uses: trainer.device, with auto choosing CUDA, then Apple's MPS, then the CPU."""

import torch

from trainer.core.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda: no CUDA device is visible here; use trainer.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "trainer.device=mps: Apple's MPS is not available here; use trainer.device=auto or cpu"
        )
    return torch.device(name)
