"""The construct registry: spec key -> ConstructDef (constructs/api.py)."""

from __future__ import annotations

from .api import ConstructDef

CONSTRUCTS: dict[str, ConstructDef] = {}

#: called after each change of the registry (the spec schema rebuilds its node union)
_ON_REGISTER: list = []


def register_construct(definition: ConstructDef) -> ConstructDef:
    """Register a construct (its spec key must be new). Register it before loading specs that
    use it: the spec schema is assembled from the registry (spec/schema.py rebuilds it)."""
    if definition.key in CONSTRUCTS:
        raise ValueError(f"construct {definition.key!r} is registered twice")
    CONSTRUCTS[definition.key] = definition
    for hook in _ON_REGISTER:
        hook()
    return definition


def unregister_construct(key: str) -> ConstructDef:
    """Remove a construct (a test's, a plugin reloaded); models compiled with it keep running."""
    definition = CONSTRUCTS.pop(key)
    for hook in _ON_REGISTER:
        hook()
    return definition
