"""Training batches: a pure function of the step, so that a resumed run sees the same data.

Generated data sets (parity, state_tracking, sparse_recovery) give fresh samples every step by
default; fixed sets (digits, wide_digits, files) are shuffled once per epoch with a generator
seeded by (seed, epoch). Under DDP each rank takes its slice of the same global batch.
"""

from __future__ import annotations

import torch

from ..data import Data, load_data

GENERATED = ("parity", "state_tracking", "sparse_recovery")


class Batches:
    def __init__(self, train, rank: int = 0, world: int = 1):
        d = train.data
        self.d, self.bs, self.rank, self.world = d, train.batch_size, rank, world
        if self.bs % world:
            raise ValueError(f"batch_size {self.bs} is not divisible by {world} processes")
        self.generated = d.name in GENERATED
        self.fresh = d.fresh if d.fresh is not None else self.generated
        self._train = None if self.fresh else self._load("train", d.n_train)

    def _load(self, split: str, n: int) -> Data:
        return load_data(
            self.d.name,
            split=split,
            seed=self.d.seed,
            n=n if self.generated else None,
            **self.d.params,
        )

    @property
    def steps_per_epoch(self) -> int:
        n = self.d.n_train if self._train is None else len(self._train)
        return max(n // self.bs, 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step`, this rank's slice."""
        if self.fresh:
            seed = self.d.seed * 1_000_000 + step + 1
            data = load_data(self.d.name, split="train", seed=seed, n=self.bs, **self.d.params)
            x, y = data.x, data.y
        else:
            spe = self.steps_per_epoch
            epoch, i = divmod(step, spe)
            g = torch.Generator().manual_seed(self.d.seed * 7_919 + epoch)
            idx = torch.randperm(len(self._train), generator=g)[i * self.bs : (i + 1) * self.bs]
            x, y = self._train.x[idx], self._train.y[idx]
        per = self.bs // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return x[sl], y[sl]

    def split(self, name: str) -> Data:
        return self._load(name, self.d.n_val if name == "val" else self.d.n_test)
