"""`custom`: a user's own nn.Module class, imported by dotted path.

Importing runs the user's code, so the compiler refuses a spec with a custom block unless the
caller trusts it (`--trust-imports`, `trust_imports=True`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from .registry import BlockParams, Shape, ShapeError, register_block


class CustomParams(BlockParams):
    target: str = Field(
        pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$", description="pkg.module.Class"
    )
    kwargs: dict[str, Any] = {}


@contextlib.contextmanager
def importable_beside(file: str):
    """The folder of spec `file` on the import path for a while: `custom` targets live beside it."""
    folder = str(Path(file).resolve().parent) if Path(file).is_file() else None
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            sys.path.remove(folder)


def import_target(target: str) -> type:
    """The class named by a dotted path."""
    mod_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import '{target}': {e}") from None


@register_block("custom", CustomParams, arity=(1, None))
def custom(p: CustomParams, shapes: list[Shape]) -> nn.Module:
    """A user's nn.Module (`target: pkg.mod.Class`, `kwargs: {...}`); needs trust_imports."""
    cls = import_target(p.target)
    kwargs = dict(p.kwargs)
    if "in_shapes" in inspect.signature(cls).parameters:
        kwargs["in_shapes"] = shapes  # let the class size itself from its inputs
    with torch.device("cpu"):  # user code may compute at init: never on the meta device
        module = cls(**kwargs)
    if not isinstance(module, nn.Module):
        raise ShapeError(f"'{p.target}' is not a torch.nn.Module")
    return module
