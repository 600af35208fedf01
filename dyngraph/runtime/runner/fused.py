"""The fused decision kernels in a runner (runtime/kernels.cpp): an exit's criterion and the
positions of the rows that go on, gathering and writing rows, a per-token query grid, each
in one call where ATen takes 5 to 15 ops of 1-3 us each. The exporting process copies its
built kernels into the export (`dyngraph_runner/dyngraph_kernels.so`, compiled machine code
like an `--aot` package: no compiler on the deployment); the runner loads them where the
machine, Python and torch are those they were built for, and otherwise runs the same rules as
ATen ops (a warning says why). `DYNGRAPH_KERNELS=0` keeps the ATen ops. Imports nothing but
torch."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

NAME = "dyngraph_kernels"  # (the module name the kernels were built under)
FILE = f"dyngraph_runner/{NAME}.so"
MAX_PROB_BELOW, ENTROPY_ABOVE, AT_LEAST = 0, 1, 4  # rules of rows_where (as kernels.cpp)
RULES = {"max_prob": MAX_PROB_BELOW, "entropy": ENTROPY_ABOVE}
FLOATS = (torch.float32, torch.float64)


def built_for() -> dict:
    """What kernels built here run on (a manifest's `kernels` entry, beside the file): a
    CPython extension for this torch, Python and machine."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return {"file": FILE, "torch": torch.__version__, "python": python,
            "machine": platform.machine()}  # fmt: skip


def load(root: Path, info: dict | None) -> Any:
    """The kernels of the export in `root` (its manifest's `kernels` entry), or None: none
    copied, built for another machine, Python or torch, or `DYNGRAPH_KERNELS=0`."""
    if info is None or os.environ.get("DYNGRAPH_KERNELS", "1") == "0":
        return None
    here, keys = built_for(), ("torch", "python", "machine")
    if any(info.get(k) != here[k] for k in keys):
        why = "built for " + ", ".join(f"{k} {info.get(k)}" for k in keys)
    else:
        spec = importlib.util.spec_from_file_location(NAME, root / info["file"])
        try:  # (not put in sys.modules: the runner's own copy)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except (ImportError, OSError, AttributeError) as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    warnings.warn(f"{root}: the export's fused decision kernels are not used ({why}); "
                  "decisions run as ATen ops", stacklevel=3)  # fmt: skip
    return None
