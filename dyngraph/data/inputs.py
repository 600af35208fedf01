"""Turning what a user passes to `profile` into tensors."""

from __future__ import annotations

import torch

from .sets import Data, load_data


def as_data(data, labels=None, spec=None, n: int | None = None, split: str = "test") -> Data:
    """A Data from a tensor, (x, y) tensors, a Data, a Dataset/DataLoader of (x, y) or x, or a
    data set's name."""
    if isinstance(data, str):
        params, seed = {}, 0
        if spec is not None and spec.train is not None and spec.train.data.name == data:
            params, seed = dict(spec.train.data.params), spec.train.data.seed
        ids = spec is not None and spec.input.dtype == "int64"
        pad = spec.input.pad_id if spec is not None else None
        return load_data(data, split=split, seed=seed, n=n, ids=ids, pad=pad, **params)
    if isinstance(data, Data):
        d = data
    elif isinstance(data, list | tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        d = Data(torch.as_tensor(data[0]), torch.as_tensor(data[1]))  # (x, y) tensors or arrays
    elif isinstance(data, torch.Tensor):
        d = Data(data, None if labels is None else torch.as_tensor(labels))
    else:  # a Dataset or a DataLoader
        xs, ys = [], []
        for item in data:
            if isinstance(item, list | tuple):
                xs.append(torch.as_tensor(item[0]))
                ys.append(torch.as_tensor(item[1]))
            else:
                xs.append(torch.as_tensor(item))
        batched = isinstance(data, torch.utils.data.DataLoader)
        cat = torch.cat if batched else torch.stack
        d = Data(cat(xs), cat(ys) if ys else None)
    if labels is not None and d.y is None:
        d = Data(d.x, torch.as_tensor(labels), d.meta, d.name)
    return d.subset(n)
