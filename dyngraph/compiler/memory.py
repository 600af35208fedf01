"""Will a model fit? Its size read off a build on the meta device, before anything is allocated.

Validation builds every block on the meta device (shapes, no storage), so a spec that names a
billion hidden units validates in milliseconds; the same build tells how many bytes the real
weights and the largest activation of one sample will take, and a model that would not fit in
this machine's memory is an error at the line of its largest block.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import nn

from ..core.errors import Problem
from .names import leaves

#: A model may use at most this fraction of the memory available when it is compiled.
MEMORY_FRACTION = 0.5
#: Overrides the budget (bytes), e.g. to keep a fuzz run's processes small.
BUDGET_ENV = "DYNGRAPH_MAX_MODEL_BYTES"


def available_bytes() -> int:
    """Memory available to a new allocation now (MemAvailable on Linux; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def budget_bytes() -> int:
    """The bytes a model may take: a fraction of what is available, or DYNGRAPH_MAX_MODEL_BYTES."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        return int(float(env))
    return int(MEMORY_FRACTION * available_bytes())


def human(n: float) -> str:
    """Bytes as a person reads them: 1.5 GB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000:
            return f"{n:.3g} {unit}"
    return f"{n / 1000:.3g} PB"


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count their would-be size)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def memory_problems(builder: Any, file: str) -> list[Problem]:
    """Problems if the model `builder` built (on the meta device) would not fit in memory.

    Counted: every block's parameters and buffers once, and a few copies of the largest
    activation of one sample (the cost counter runs each unit at batch 1).
    """
    from ..core.yaml_loader import locate

    budget = budget_bytes()
    sizes = [
        (tensor_bytes(m), builder.block_paths.get(id(m), ("graph",)))
        for m in [*(m for _, m in leaves(builder.blocks)), *builder.controllers.values()]
    ]
    weights = sum(n for n, _ in sizes)
    shapes = [s for s in builder.shapes.values() if s is not None]
    activation = 4 * 4 * max((math.prod(s) for s in shapes), default=0)  # float32, a few live
    if weights + activation <= budget:
        return []
    largest, path = max(sizes, key=lambda t: t[0], default=(0, ("graph",)))
    if largest >= activation:
        where, what = path, f"its weights take {human(weights)} (this block {human(largest)})"
    else:
        where, what = ("input", "shape"), f"one sample's activations take {human(activation)}"
    line, col = locate(builder.raw, where)
    return [
        Problem(
            file,
            line,
            col,
            "",
            f"the model does not fit: {what}, more than the {human(budget)} it may use "
            f"({int(MEMORY_FRACTION * 100)}% of the memory available; {BUDGET_ENV} sets it)",
        )
    ]
