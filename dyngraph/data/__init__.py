"""Data sets that ship or are generated; nothing downloads.

`load_data(name, split, ...)` returns a `Data` of inputs, targets and per-sample metadata
(e.g. the difficulty k of state_tracking, the side of a wide digit). Splits are fixed by the
seed: the same call gives the same samples on every machine.
"""

from __future__ import annotations

from . import sequences  # noqa: F401  (registers the sequence sets)
from .sets import DATASETS, Data, DataError, load_data, load_file
from .splits import GENERATED, load_split

__all__ = ["DATASETS", "GENERATED", "Data", "DataError", "load_data", "load_file", "load_split"]
