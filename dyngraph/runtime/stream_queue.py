"""The queues of a stream (runtime/stream.py): rows waiting for a stage, kept as blocks of the
runs they came from and gathered into one batch when the stage takes them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class Rows:
    """Rows of a stream: their stream ids, values and states (each [rows, ...])."""

    ids: torch.Tensor
    env: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def values(self) -> list[torch.Tensor]:
        return [self.ids, *self.env.values(), *self.states.values()]

    def like(self, values: list[torch.Tensor], names: list[str] | None = None) -> Rows:
        """Rows with `values` in the order of `values()` (env names `names`, default its own)."""
        names = list(self.env) if names is None else names
        n = len(names)
        env = dict(zip(names, values[1 : 1 + n], strict=True))
        return Rows(values[0], env, dict(zip(self.states, values[1 + n :], strict=True)))


@dataclass
class Block:
    """Rows waiting in a queue: the rows at positions `pos` (None: all) of `src`, gathered
    only when a stage takes them (one copy per row per stage)."""

    src: Rows
    pos: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.src) if self.pos is None else self.pos.shape[0]

    def split(self, cut: int) -> tuple[Block, Block]:
        pos = (
            self.pos
            if self.pos is not None
            else torch.arange(len(self.src), device=self.src.ids.device)
        )
        return Block(self.src, pos[:cut]), Block(self.src, pos[cut:])


def gather(blocks: list[Block]) -> Rows:
    """The rows of `blocks`, in order, as one batch. A value some blocks lack (a halting
    node's output, written for rows that went round its loop before) is left out: the stage
    writes it again for all of them."""
    first = blocks[0].src
    if len(blocks) == 1 and blocks[0].pos is None:
        return first
    names = [k for k in first.env if all(k in b.src.env for b in blocks)]
    srcs = [
        b.src
        if len(b.src.env) == len(names)
        else Rows(b.src.ids, {k: b.src.env[k] for k in names}, b.src.states)
        for b in blocks
    ]
    if len(blocks) == 1:
        return srcs[0].like([v.index_select(0, blocks[0].pos) for v in srcs[0].values()], names)
    n = sum(len(b) for b in blocks)
    out = [v.new_empty((n, *v.shape[1:])) for v in srcs[0].values()]
    at, k = 0, kernels.for_device(out[0].device)
    for b, src in zip(blocks, srcs, strict=True):
        m = len(b)
        for dst, v in zip(out, src.values(), strict=True):
            part = dst.narrow(0, at, m)
            if k is not None and v.is_contiguous():  # a memcpy per row
                k.copy_rows_(part, None, v, b.pos)
            elif b.pos is None:
                part.copy_(v)
            else:
                torch.index_select(v, 0, b.pos, out=part)
        at += m
    return srcs[0].like(out, names)


class Queue:
    """The rows waiting for one stage, in arrival order."""

    def __init__(self) -> None:
        self.blocks: deque[Block] = deque()
        self.rows = 0

    def push(self, src: Rows, pos: torch.Tensor | None) -> None:
        n = len(src) if pos is None else pos.shape[0]
        if n == 0:
            return
        if n == len(src):  # every row, in order (positions are ascending): nothing to gather
            pos = None
        if pos is not None and 4 * n < len(src):  # a few rows of many: gathered now, so
            src, pos = src.like([v.index_select(0, pos) for v in src.values()]), None  # that
            # a waiting block never holds much more than its own rows
        self.blocks.append(Block(src, pos))
        self.rows += n

    def pop(self, n: int) -> Rows:
        """The first `n` rows (fewer if it holds fewer), as one batch."""
        out, got = [], 0
        while self.blocks and got < n:
            b = self.blocks.popleft()
            if got + len(b) > n:  # the rest waits
                b, rest = b.split(n - got)
                self.blocks.appendleft(rest)
            out.append(b)
            got += len(b)
        self.rows -= got
        return gather(out)
