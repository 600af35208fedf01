"""The splits a spec's `train.data` names: which source serves each, and loading one.

A split comes from a built-in data set (its own fixed split of that name) or from a file. A file
that serves several splits is divided by a seeded permutation: `split.val` and `split.test` of
its rows go to those splits and the rest to training, so the three never overlap. Every loaded
split says where it came from (`Data.origin`), and the reports print it.
"""

from __future__ import annotations

import torch

from .sets import DATASETS, SPLITS, Data, DataError, is_file_name, load_data, load_file

#: Built-in sets generated from a seed: their sizes (`n_train`, `n_val`, `n_test`) and
#: `fresh` mean something; a fixed set or a file has the size it has.
GENERATED = (
    "parity",
    "state_tracking",
    "sparse_recovery",
    "state_sequence",
    "state_tokens",
    "addition",
    "pointer_chase",
)


def sharing(dspec, split: str) -> list[str]:
    """The splits served by the same file as `split` (in SPLITS order)."""
    src = dspec.source(split)
    return [s for s in SPLITS if dspec.source(s) == src] if is_file_name(src) else [split]


def _file_part(dspec, split: str, data: Data) -> tuple[Data, str]:
    """The rows of a shared file that belong to `split`, and how that reads in a report."""
    parts = sharing(dspec, split)
    if len(parts) == 1:
        return data, f"{data.name} ({len(data):,} samples)"
    n = len(data)
    sizes = {s: int(round(getattr(dspec.split, s) * n)) for s in parts if s != "train"}
    sizes["train"] = n - sum(sizes.values()) if "train" in parts else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(dspec.seed))
    start = 0
    for s in SPLITS:
        if s in parts:
            if s == split:
                idx = order[start : start + sizes[s]]
                frac = sizes[s] / n
                desc = (
                    f"{frac:.0%} of {data.name} ({len(idx):,} of {n:,} samples, "
                    f"seeded split {dspec.seed}, shared with {', '.join(p for p in parts if p != s)})"
                )
                return data.take(idx), desc
            start += sizes[s]
    raise AssertionError(split)


def load_split(dspec, split: str, n: int | None = None) -> Data:
    """Split `split` of a spec's `train.data`; `Data.origin` says where it came from.

    Args:
        dspec: the spec's DataSpec (file paths already absolute: `load_spec` makes them so).
        split: train, val or test.
        n: for generated sets, how many samples (default n_train / n_val / n_test).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    src = dspec.source(split)
    if is_file_name(src):
        data, desc = _file_part(dspec, split, load_file(src, dspec._ids, dspec._pad))
        data.origin = f"{split}: {desc}"
        return data
    if src not in DATASETS:
        raise DataError(f"unknown data set '{src}'")
    if n is None and src in GENERATED:
        n = {"train": dspec.n_train, "val": dspec.n_val, "test": dspec.n_test}[split]
    data = load_data(src, split=split, seed=dspec.seed, n=n, **dspec.params)
    data.origin = f"{split}: the {split} split of built-in {src} ({len(data):,} samples)"
    return data
