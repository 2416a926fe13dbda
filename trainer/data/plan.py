"""How an epoch's samples become optimizer steps, for one process or many.

The epoch's (shuffled) sequence is cut into global batches of `batch_size x world_size`; each global
batch is dealt over the processes by position (rank r takes positions r, r + W, ...). So W processes
with batch B see, step for step, exactly the samples one process with batch W x B sees, and every
process takes the same number of steps without any sample repeated or left out.

A last global batch too small to give every process two samples is merged into the one before
(a batch of one breaks BatchNorm in training): that step is up to 2W - 1 samples larger.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochPlan:
    samples: int
    batch_size: int  # per process
    world_size: int = 1
    drop_last: bool = False

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.global_batch)
        if rest == 0 or self.drop_last or (full > 0 and rest < 2 * self.world_size):
            return full
        return full + 1

    def bounds(self, step: int) -> tuple[int, int]:
        """[start, end) of the step's global batch in the epoch's sequence."""
        start = step * self.global_batch
        last = step == len(self) - 1 and not self.drop_last
        return start, self.samples if last else start + self.global_batch

    def share(self, step: int, rank: int) -> range:
        """The sequence positions process `rank` trains on at this step."""
        start, end = self.bounds(step)
        return range(start + rank, end, self.world_size)
