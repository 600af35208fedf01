"""Constructs: one file each (schema, runtime in every mode, paths); the registry."""

from . import exit, gate, halting, metalayer  # noqa: F401  (registration side effects)
from .registry import CONSTRUCTS, ConstructDef, register_construct

__all__ = ["CONSTRUCTS", "ConstructDef", "register_construct"]
