"""Blocks: the registry and the built-ins (importing this module registers them)."""

from . import basic, custom, decision, sequence, steps  # noqa: F401  (registration side effects)
from .registry import (
    BLOCKS,
    ROLES,
    BlockDef,
    BlockParams,
    ShapeError,
    build_block,
    get_block,
    register_block,
)

__all__ = [
    "BLOCKS",
    "ROLES",
    "BlockDef",
    "BlockParams",
    "ShapeError",
    "build_block",
    "get_block",
    "register_block",
]
