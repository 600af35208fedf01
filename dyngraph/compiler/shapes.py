"""Output shapes of blocks without running them on real data: meta or fake tensors.

Validation builds blocks on the meta device, where a block runs on meta inputs directly; a
block holding real weights (a user's) runs under FakeTensorMode. Blocks repeated by `repeat`
share one shape computation (`structure_key`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .units import Shape, example


@contextlib.contextmanager
def _quiet_fake_tensor():
    """FakeTensorMode logs a traceback for every failing op; a user should see one line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def fake_shapes(fn, in_shapes: list[Shape]) -> Any:
    """Run `fn` on fake tensors of per-sample shapes `in_shapes`; return output shapes (no batch).

    A module built on the meta device runs on meta inputs directly (~50 us a block, against
    ~20 ms under FakeTensorMode); anything that cannot (a user's block holding real weights, an
    op without a meta kernel) runs under FakeTensorMode.
    """
    out = None
    if torch.empty(0).is_meta:
        with contextlib.suppress(Exception):  # FakeTensorMode below says what is wrong
            out = fn(*[example(s, 2, device="meta") for s in in_shapes])
    if out is None:
        with _quiet_fake_tensor(), FakeTensorMode(allow_non_fake_inputs=True):
            out = fn(*[example(s, 2) for s in in_shapes])  # batch 2: BatchNorm

    def shape(t):
        if isinstance(t, torch.Tensor):
            return tuple(t.shape[1:])
        return tuple(shape(v) for v in t)

    return shape(out)


def structure_key(fn: Any, in_shapes: list[Shape]) -> tuple | None:
    """What decides the output shapes of a built-in block: its modules' types, their plain
    attributes and their tensors' shapes, and the input shapes. None for anything else (a
    user's block may compute its shapes in ways these do not show)."""
    if not isinstance(fn, nn.Module):
        return None
    parts: list = [tuple((type(s).__name__, *s) for s in in_shapes)]
    for name, sub in fn.named_modules():
        if not type(sub).__module__.startswith(("dyngraph.", "torch.")):
            return None
        plain = sorted(
            (k, repr(v))
            for k, v in vars(sub).items()
            if not k.startswith("_") and isinstance(v, int | float | str | bool | tuple | list)
        )
        tensors = [
            (k, tuple(t.shape))
            for k, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        ]
        parts.append((name, type(sub).__qualname__, tuple(plain), tuple(tensors)))
    return tuple(parts)
