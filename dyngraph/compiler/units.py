"""Units: the static pieces a compiled model runs (segments and decision units).

Every unit is a plain nn.Module with a static graph; its cost is counted once at batch 1 and
it is compiled once, with a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Shape = tuple[int, ...]


class IdsShape(tuple):
    """The per-sample shape of token ids (int64): a Shape that fake and example inputs fill
    with ids instead of floats."""


def example(shape: Shape, batch: int, generator=None, device="cpu") -> torch.Tensor:
    """An input of per-sample `shape` at `batch`: random floats, or token id 1 for ids."""
    if isinstance(shape, IdsShape):
        return torch.ones(batch, *shape, dtype=torch.long, device=device)
    return torch.randn(batch, *shape, generator=generator).to(device)


@dataclass(eq=False)
class Unit:
    """A static piece of the model: a segment of layers or a decision unit.

    Attributes:
        index: its position in the model's unit table (a column of the trace's unit counts).
        name: what a person reads ("segment 0", "exit 2 head", "gate 1 policy").
        kind: "segment" or "decision".
        module: the eager module (an fx GraphModule for segments).
        in_shapes: per-sample shapes of its inputs, all batched along dimension 0.
        construct: the construct node it belongs to ("exit 2"), or "" for top-level segments.
        head: a decision unit that predicts the task (an exit head): a stage's `heads`.
        per_token: it computes each token from that token alone, so the tokens of many
            sequences can run it as one [1, N, D] call (blocks.registry.acts_per_token).
        rows: after a per-token exit, the block that runs it with partial queries
            (runtime/token_rows.py), or None.
    """

    index: int
    name: str
    kind: str
    module: nn.Module
    in_shapes: list[Shape]
    construct: str = ""
    head: bool = False
    fn: Callable | None = field(default=None, repr=False)
    order: tuple[int, int] = (0, 0)  # (plan step, creation): sorts units into execution order
    per_token: bool = False
    rows: nn.Module | None = None  # the block whose `forward_rows` runs its partial queries
    # per-token costs of a unit with partial queries, counted once (runtime/lengths.py)
    token_costs: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def __call__(self, *args: torch.Tensor):
        return (self.fn if self.fn is not None else self.module)(*args)

    def example_inputs(
        self, batch: int = 1, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ...]:
        """Random inputs of the unit's shapes, for counting and timing."""
        g = torch.Generator().manual_seed(0)
        return tuple(example(s, batch, g, device) for s in self.in_shapes)
