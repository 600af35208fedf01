"""The mechanics of a stream (runtime/stream.py): rows waiting in queues, the plan cut into
stages, and a lane that runs a stage on rows and sends them on."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .context import RunContext
from .model import DynamicOutput
from .steps import SegmentStep
from .trace import Trace


@dataclass
class Rows:
    """Rows waiting for a stage: their stream ids, live values and states."""

    ids: torch.Tensor
    env: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, pos: torch.Tensor | None, keep: set[str] | None) -> Rows:
        """The rows at positions `pos` (None: all), with the values named in `keep` (None: all)."""
        env = {k: v for k, v in self.env.items() if keep is None or k in keep}
        if pos is None:
            return Rows(self.ids, env, dict(self.states))
        pick = lambda v: v.index_select(0, pos)  # noqa: E731
        return Rows(
            pick(self.ids),
            {k: pick(v) for k, v in env.items()},
            {k: pick(v) for k, v in self.states.items()},
        )


def _cat(blocks: list[Rows]) -> Rows:
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    # a value some rows lack (a halting node's output, written for the rows that went round
    # its loop before) is written again by the stage for all of them
    names = [k for k in first.env if all(k in b.env for b in blocks)]
    return Rows(
        torch.cat([b.ids for b in blocks]),
        {k: torch.cat([b.env[k] for b in blocks]) for k in names},
        {k: torch.cat([b.states[k] for b in blocks]) for k in first.states},
    )


class Queue:
    """The rows waiting for one stage, in arrival order."""

    def __init__(self) -> None:
        self.blocks: deque[Rows] = deque()
        self.rows = 0

    def push(self, r: Rows) -> None:
        if len(r):
            self.blocks.append(r)
            self.rows += len(r)

    def pop(self, n: int) -> Rows:
        """The first `n` rows (fewer if it holds fewer)."""
        out, got = [], 0
        while self.blocks and got < n:
            b = self.blocks.popleft()
            if got + len(b) > n:  # split: the rest waits (copied: no view reaches a unit)
                cut = n - got
                head = torch.arange(cut, device=b.ids.device)
                self.blocks.appendleft(
                    b.select(torch.arange(cut, len(b), device=b.ids.device), None)
                )
                b = b.select(head, None)
            out.append(b)
            got += len(b)
        self.rows -= got
        return _cat(out)


@dataclass
class Stage:
    """Some steps of the plan, run together on a batch of rows.

    Attributes:
        ops: functions of the RunContext, in order; only the last one routes: it returns None
            (every current row goes on to the next stage) or {0: positions, 1: positions}
            (rows that run this stage again, rows that go to the next stage), the others
            going past the node, to stage `past`.
        past: the stage after the node's last part.
        live: the values read after the node (what rows going past keep).
    """

    ops: list[Callable]
    past: int
    live: set[str]


def _op(step) -> Callable:
    def run(ctx):
        step.run(ctx)

    return run


def stages_of(plan) -> list[Stage]:
    """The plan cut into stages: at every construct node, and at every part of a node whose
    runtime has `stream_parts()`; after a per-token exit, the rest as one stage."""
    stages: list[Stage] = []
    pending: list[Callable] = []  # static segments waiting for the next decision
    steps = plan.steps
    for i, step in enumerate(steps):
        if getattr(step, "freezes_tokens", False):
            pending += [_op(s) for s in steps[i:]]
            break
        if isinstance(step, SegmentStep):
            pending.append(_op(step))
            continue
        parts = step.stream_parts() if hasattr(step, "stream_parts") else [_op(step)]
        past = len(stages) + len(parts)
        for j, part in enumerate(parts):
            stages.append(Stage((pending if j == 0 else []) + [part], past, step.live_after))
        pending = []
    if pending or not stages:
        stages.append(Stage(pending, len(stages) + 1, {plan.output_id}))
    return stages


@dataclass
class Log:
    """A stream's log in stream row ids: what `Trace` reads off a RunContext."""

    batch: int
    device: torch.device
    input: torch.Tensor  # an empty tensor of the inputs' shape (the trace reads positions off it)
    compacting: bool = True
    width: int = 1
    events: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    query_padding: list = field(default_factory=list)

    @property
    def samples(self) -> int:
        return self.batch


class Lane:
    """The queues of one stream of rows of one shape (a sequence model: of one length)."""

    def __init__(self, model, stages: list[Stage], shape: tuple, device, log_rows: bool) -> None:
        self.model, self.stages = model, stages
        self.queues = [Queue() for _ in stages]
        self.shape, self.device = shape, device
        self.n = 0  # rows admitted
        self.where: list[torch.Tensor] = []  # their ids in the whole stream, by admission
        self.out: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, outputs) as rows leave
        self.done: list[tuple[torch.Tensor, float]] = []  # (ids, time) of each stage run
        self.log = Log(0, device, torch.empty((0, *shape)))
        self.log_rows = log_rows

    def admit(self, x: torch.Tensor, where: torch.Tensor) -> None:
        ids = torch.arange(self.n, self.n + x.shape[0], device=x.device)
        self.n += x.shape[0]
        self.where.append(where)
        self.queues[0].push(Rows(ids, {"input": x}, {}))

    def run(self, k: int, n: int) -> None:
        """Stage `k` on the first `n` rows of its queue."""
        rows = self.queues[k].pop(n)
        stage, plan = self.stages[k], self.model._plan
        x = next(iter(rows.env.values()))
        ctx = RunContext(x, "infer", plan.trace_sizes, out_column=plan.out_column)
        ctx.env, ctx.states = dict(rows.env), dict(rows.states)
        ctx.input = rows.env.get("input", x.new_empty(0))
        route = None
        for op in stage.ops:
            if not ctx.rows:
                break
            route = op(ctx)
        self._translate(ctx, rows.ids)
        if self.log_rows:
            self.done.append((rows.ids, time.perf_counter()))
        cur = None if ctx.rows == 0 else ctx.idx  # positions of the rows still here
        if ctx.out is not None:  # some rows left at an exit
            if ctx.rows == 0:
                left = None
            else:
                mask = torch.ones(len(rows), dtype=torch.bool, device=x.device)
                mask[cur] = False
                left = torch.where(mask)[0]
            out = ctx.out if left is None else ctx.out.index_select(0, left)
            self.out.append((rows.ids if left is None else rows.ids.index_select(0, left), out))
        if not ctx.rows:
            return
        here = Rows(rows.ids if cur is None else rows.ids.index_select(0, cur), ctx.env, ctx.states)
        if route is None:
            return self._send(here, k + 1, None, stage)
        sent = torch.zeros(len(here), dtype=torch.bool, device=x.device)
        for offset, pos in route.items():
            sent[pos] = True
            self._send(here, k + offset, pos, stage)
        if not bool(sent.all()):
            self._send(here, stage.past, torch.where(~sent)[0], stage)

    def _send(self, here: Rows, to: int, pos: torch.Tensor | None, stage: Stage) -> None:
        """The rows of `here` at `pos` (None: all) wait for stage `to` now (past the last
        stage: they are done, with the plan's output)."""
        if pos is not None and pos.shape[0] == 0:
            return
        if to >= len(self.stages):
            oid = self.model._plan.output_id
            r = here.select(pos, {oid})
            self.out.append((r.ids, r.env[oid]))
            return
        # past the node, rows keep what is read after it; within it, everything
        self.queues[to].push(here.select(pos, stage.live if to == stage.past else None))

    def _translate(self, ctx, ids: torch.Tensor) -> None:
        """The pass's log, its rows as stream ids (each record's rows: the row map then)."""

        def g(rows):
            return ids if rows is None else ids.index_select(0, rows)

        log = self.log
        log.events += [(u, g(r), w) for u, r, w in ctx.events]
        log.decisions += [(f, c, g(r), w, v) for f, c, r, w, v in ctx.decisions]
        log.tokens += [(u, nm, g(r), v, kd) for u, nm, r, v, kd in ctx.tokens]
        log.query_padding += ctx.query_padding

    def held(self) -> int:
        return sum(q.rows for q in self.queues)

    def result(self, lengths: torch.Tensor | None) -> DynamicOutput:
        """Outputs and trace of the lane's rows, in admission order."""
        ids = torch.cat([i for i, _ in self.out])
        vals = torch.cat([v for _, v in self.out])
        logits = vals.new_empty((self.n, *vals.shape[1:]))
        logits[ids] = vals
        self.log.batch = self.n
        return DynamicOutput(
            logits, Trace(self.log, len(self.model.units), self.model.paths, lengths)
        )
