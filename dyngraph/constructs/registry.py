"""The construct registry: a spec key, its schema, and a builder of its runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class ConstructDef:
    """A registered construct.

    `build(spec, builder, site) -> (runtime, out_shape)` checks and builds one node of this
    construct; the runtime has `reads`, `writes` and `run(ctx)` (see runtime/context.py).
    """

    key: str
    schema: type[BaseModel]
    build: Callable
    trace_field: str  # the Trace column group this construct's decisions fill
    objective: Callable | None = None  # objective(lc) -> {term: loss}; see training/loss.py


CONSTRUCTS: dict[str, ConstructDef] = {}


def register_construct(key: str, schema: type[BaseModel], trace_field: str) -> Callable:
    """Register a construct builder under spec key `key`."""

    def deco(fn: Callable) -> Callable:
        if key in CONSTRUCTS:
            raise ValueError(f"construct {key!r} is registered twice")
        CONSTRUCTS[key] = ConstructDef(key, schema, fn, trace_field)
        return fn

    return deco


def register_objective(key: str) -> Callable:
    """Attach the training objective of construct `key` (defined in the construct's own file)."""

    def deco(fn: Callable) -> Callable:
        import dataclasses

        CONSTRUCTS[key] = dataclasses.replace(CONSTRUCTS[key], objective=fn)
        return fn

    return deco
