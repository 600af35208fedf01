"""The block registry: a name, a parameter model and a builder for every block.

A block is built from its validated parameters and the per-sample shapes of its inputs, so
that sizes such as `in` can be left out and are inferred. A builder raises `ShapeError` for an
input it cannot take; the compiler reports it at the line of the node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import fx, nn

from ..core.types import SPEC_CONFIG

Shape = tuple[int, ...]

#: Where a block may be used.
ROLES = {
    "module": "a static layer or block, anywhere in the graph",
    "step": "a halting step: forward(state, x) -> state",
    "gate_policy": "decides a gate: feed-forward, recurrent (shared) or one-shot (BlockDrop)",
    "router": "a metalayer controller: picks one choice per sample",
    "halting_unit": "ACT halting unit / PonderNet lambda unit: forward(state) -> probability",
    "stop_policy": "L2S stop policy: forward(features) -> stop probability",
}


class BlockParams(BaseModel):
    """Base of every block's parameter model: unknown keys are rejected."""

    model_config = {**SPEC_CONFIG, "frozen": True}


class ShapeError(ValueError):
    """A block cannot take inputs of the given shapes."""


@dataclass(frozen=True)
class BlockDef:
    """A registered block."""

    name: str
    params: type[BlockParams]
    build: Callable[[Any, list[Shape]], nn.Module]
    role: str
    arity: tuple[int, int | None]
    doc: str


BLOCKS: dict[str, BlockDef] = {}


def register_block(
    name: str,
    params: type[BlockParams],
    role: str = "module",
    arity: int | tuple[int, int | None] = 1,
) -> Callable:
    """Register a builder `fn(params, in_shapes) -> nn.Module` under `name`.

    Args:
        name: the `type:` that specs use.
        params: the pydantic model of its parameters.
        role: one of ROLES.
        arity: the number of inputs, or (min, max) with max None for any number.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")

    def deco(fn: Callable) -> Callable:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice")
        ar = (arity, arity) if isinstance(arity, int) else arity
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        BLOCKS[name] = BlockDef(name, params, fn, role, ar, doc)
        return fn

    return deco


def get_block(name: str) -> BlockDef:
    """Look up a block by name, with a "did you mean" for a misspelling."""
    from ..core.errors import did_you_mean

    try:
        return BLOCKS[name]
    except KeyError:
        raise KeyError(f"unknown block type '{name}'{did_you_mean(name, BLOCKS)}") from None


def build_block(name: str, params: dict | BlockParams, in_shapes: list[Shape]) -> nn.Module:
    """Build block `name` for inputs of per-sample shapes `in_shapes` (Python API helper)."""
    bd = get_block(name)
    p = params if isinstance(params, BlockParams) else bd.params.model_validate(params)
    return bd.build(p, [tuple(s) for s in in_shapes])


_SEQUENCE: ContextVar[bool] = ContextVar("sequence_model", default=False)


@contextlib.contextmanager
def sequence_model(on: bool) -> Iterator[None]:
    """Blocks built inside read per-sample [L, D] inputs as sequences of variable length
    (a sequence spec's graph): heads and decision makers pool over the tokens instead of
    flattening them."""
    token = _SEQUENCE.set(on)
    try:
        yield
    finally:
        _SEQUENCE.reset(token)


def in_sequence_model() -> bool:
    """Whether the blocks being built belong to a sequence model (see sequence_model)."""
    return _SEQUENCE.get()


def is_sequence(shape: Shape) -> bool:
    """Whether a per-sample `shape` is a sequence [L, D] of a sequence model being built."""
    return _SEQUENCE.get() and len(shape) == 2


def in_features(shapes: list[Shape], given: int | None, what: str = "in") -> int:
    """The size of the last input dimension, checked against `given` when set."""
    if len(shapes[0]) == 0:
        raise ShapeError("expects an input with at least one dimension, got a scalar")
    n = shapes[0][-1]
    if given is not None and given != n:
        raise ShapeError(f"{what}={given} but its input has shape {list(shapes[0])}")
    return n


#: modules that act on each token (the last dimension) alone: a run on [1, N, D] of the tokens
#: of many sequences equals running each sequence's tokens on their own
PER_TOKEN_LEAVES = (
    nn.Linear, nn.LayerNorm, nn.Identity, nn.Dropout,
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid,
)  # fmt: skip


def acts_per_token(module: nn.Module) -> bool:
    """Whether `module` (a block, a Sequential of blocks, or a segment's fx GraphModule of
    them) computes each token from that token alone, never mixing positions: its leaves are
    `PER_TOKEN_LEAVES` and every block class above them says so (`per_token = True`)."""
    if isinstance(module, PER_TOKEN_LEAVES):
        return True
    if isinstance(module, fx.GraphModule):
        calls = [n for n in module.graph.nodes if n.op not in ("placeholder", "output")]
        return all(
            n.op == "call_module" and acts_per_token(module.get_submodule(n.target)) for n in calls
        )
    if isinstance(module, nn.Sequential) or getattr(type(module), "per_token", False):
        return all(acts_per_token(c) for c in module.children())
    return False
