"""Constructs: one file each (schema, runtime in every mode, objective, trace, docs); the registry."""

from . import exit, gate, metalayer, halting  # noqa: F401, I001  (registration; the order is the trace's)
from .api import Column, ConstructDef, Site, Sweep
from .registry import CONSTRUCTS, register_construct, unregister_construct

__all__ = [
    "CONSTRUCTS",
    "Column",
    "ConstructDef",
    "Site",
    "Sweep",
    "register_construct",
    "unregister_construct",
]
