"""Training batches: a pure function of the step, so that a resumed run sees the same data.

Generated data sets (parity, state_tracking, sparse_recovery) give fresh samples every step by
default; fixed sets (digits, wide_digits, files) are shuffled once per epoch with a generator
seeded by (data seed, epoch). The run's `train.seed` also moves the stream (another order of
the fixed set, other fresh samples) so that training seeds differ in their batches as well as
in their initialization; seed 0 keeps the stream of the data seed alone. The evaluation splits
depend on the data seed only. Under DDP each rank takes its slice of the same global batch.
"""

from __future__ import annotations

import torch

from ..data import GENERATED, Data, DataError, load_data, load_split
from ..data.inputs import as_data


class Batches:
    """The training batches and the evaluation splits of a spec's `train:` section.

    Args:
        train: the spec's TrainSpec (batch size, data, seed).
        rank, world: this process's slice of each global batch (DDP).
        data: training data a caller passes instead of the spec's: (x, y) tensors, a Data or a
            map-style Dataset (shuffled per epoch as a spec's fixed sets are), or a DataLoader
            (read in its own order; a resumed run reads past the batches already used).
    """

    def __init__(self, train, rank: int = 0, world: int = 1, data=None):
        d = train.data
        self.d, self.bs, self.rank, self.world = d, train.batch_size, rank, world
        # far apart from the data seed's own offsets (step + 1 < 10**6, epoch < 7_919)
        self._run = train.seed * 1_000_003_000
        if self.bs % world:
            raise ValueError(f"batch_size {self.bs} is not divisible by {world} processes")
        self.loader = data if isinstance(data, torch.utils.data.DataLoader) else None
        self._ids = d._ids  # token ids stay integers
        self._iter, self._pos = None, 0
        if data is not None:
            self.source, self.generated, self.fresh = "given", False, False
            self._train = None if self.loader is not None else as_training_data(data, ids=self._ids)
            return
        self.source = d.source("train")
        self.generated = self.source in GENERATED
        self.fresh = d.fresh if d.fresh is not None else self.generated
        self._train = None if self.fresh else load_split(d, "train")
        if self._train is not None and self._train.y is None:
            raise DataError(f"{self._train.origin}: no labels ('y'); training needs them")

    @property
    def origin(self) -> str:
        """Where the training samples come from, as reports print it."""
        if self.loader is not None:
            return "train: the DataLoader given"
        if self._train is not None:
            return self._train.origin
        return f"train: fresh samples of built-in {self.source} every step"

    @property
    def steps_per_epoch(self) -> int:
        if self.loader is not None:
            return max(len(self.loader), 1)
        n = self.d.n_train if self._train is None else len(self._train)
        return max(n // self.bs, 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step`, this rank's slice."""
        if self.loader is not None:
            x, y = self._loader_batch(step)
        elif self.fresh:
            seed = self.d.seed * 1_000_000 + step + 1 + self._run
            data = load_data(self.source, split="train", seed=seed, n=self.bs, **self.d.params)
            x, y = data.x, data.y
        else:
            spe = self.steps_per_epoch
            epoch, i = divmod(step, spe)
            g = torch.Generator().manual_seed(self.d.seed * 7_919 + epoch + self._run)
            idx = torch.randperm(len(self._train), generator=g)[i * self.bs : (i + 1) * self.bs]
            x, y = self._train.x[idx], self._train.y[idx]
        per = x.shape[0] // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return x[sl], y[sl]

    def _loader_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or step < self._pos:
            self._iter, self._pos = iter(self.loader), 0
        while True:
            try:
                item = next(self._iter)
            except StopIteration:  # the next epoch
                self._iter = iter(self.loader)
                item = next(self._iter)
            self._pos += 1
            if self._pos > step:
                x, y = _pair(item, "a batch of the DataLoader")
                return (x.float() if not (x.is_floating_point() or self._ids) else x), y

    def split(self, name: str) -> Data:
        """The `val` or `test` (or `train`) split of the spec's data; `origin` says which."""
        return load_split(self.d, name)


def _pair(item, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(item, list | tuple) or len(item) < 2:
        raise DataError(f"{what} must be (x, y): training needs labels")
    return torch.as_tensor(item[0]), torch.as_tensor(item[1])


def as_training_data(data, what: str = "the training data", ids: bool = False) -> Data:
    """Samples with labels from (x, y) tensors or arrays, a Data, a Dataset of (x, y) items or
    a DataLoader (its batches concatenated), with `origin` saying where they came from."""
    if isinstance(data, str):
        raise DataError(f"{what}: expected (x, y) tensors, a Dataset or a DataLoader, got a name")
    try:
        d = as_data(data)
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise DataError(
            f"{what}: expected (x, y) tensors, a Dataset or a DataLoader ({type(data).__name__}: {e})"
        ) from None
    if d.y is None or len(d.y) != len(d):
        raise DataError(f"{what}: {len(d)} inputs need as many labels")
    x = d.x if d.x.is_floating_point() or ids else d.x.float()
    y = d.y if d.y.is_floating_point() else d.y.long()
    return Data(x, y, d.meta, d.name, d.origin or f"{what} given ({len(d):,} samples)")
