"""Forced decisions, for benchmarks and tests: every row's decision drawn from its input.

`forced(model, exit=0.4, gate=0.6)` makes each node of a construct decide by a per-sample draw
fixed by the sample's input (the same in any batch), so that a benchmark sets the fraction of
rows going each way and a test sees partial batches at every decision. Each construct says what
its setting means (its `force`, constructs/*.py): the fraction leaving at each exit, running
each gated body, the probabilities of each choice, the range of steps. Production runtimes
carry nothing of this: the draw replaces the node's decision method while it is forced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def force(model, key: str, setting: Any, nodes: list | None = None) -> None:
    """Force construct `key`'s nodes of `model` (or `nodes` of them) with `setting`; None:
    their own rules again. The construct's `force(node, setting)` gives the methods that
    replace the node's decision methods while it is forced."""
    c = model._constructs.get(key)
    if c is None or c.force is None:
        raise ValueError(f"construct {key!r} cannot be forced")
    for node in model.nodes[key] if nodes is None else nodes:
        for name in node.__dict__.pop("_forced", ()):
            del node.__dict__[name]
        if setting is not None:
            methods = c.force(node, setting)
            node.__dict__.update(methods, _forced=tuple(methods))


@contextlib.contextmanager
def forced(model, **settings: Any) -> Iterator[Any]:
    """Force constructs for a while (`forced(model, exit=0.4)`); their rules come back after."""
    try:
        for key, setting in settings.items():
            force(model, key, setting)
        yield model
    finally:
        for key in settings:
            force(model, key, None)
