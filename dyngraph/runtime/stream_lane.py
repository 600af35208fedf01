"""The mechanics of a stream (runtime/stream.py): the plan cut into stages, and a lane that
runs a stage on rows and sends them on to the queues (runtime/stream_queue.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .context import RunContext
from .model import DynamicOutput
from .stream_queue import Queue, Rows
from .token_rows import TokenRows
from .trace import Trace


@dataclass
class Stage:
    """Some steps of the plan, run together on a batch of rows.

    Attributes:
        ops: functions of the RunContext, in order; only the last one routes: it returns None
            (every current row goes on to the next stage) or {0: positions, 1: positions,
            None: positions} (rows that run this stage again, that go to the next stage, that
            go past the node, to stage `past`; rows not named go past).
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


def stages_of(plan, pool_bodies: bool = False) -> list[Stage]:
    """The plan cut into stages: after every node where rows leave (`leaves_rows`: exits),
    and at every part of a node whose runtime splits it (`stream_parts(pool_bodies)`: a
    halting loop; a gate's body with `pool_bodies`); other nodes run inside a stage, as in a
    batched pass. A per-token exit ends a stage too (sequences with no running token leave
    there)."""
    stages: list[Stage] = []
    pending: list[Callable] = []  # steps waiting for the next boundary
    for step in plan.steps:
        split = getattr(step, "stream_parts", None)
        parts = split(pool_bodies) if split is not None else None
        if parts is None:
            pending.append(_op(step))
            if getattr(step, "leaves_rows", False) or getattr(step, "freezes_tokens", False):
                stages.append(Stage(pending, len(stages) + 1, step.live_after))
                pending = []
            continue
        past = len(stages) + len(parts)
        for j, part in enumerate(parts):
            stages.append(Stage((pending if j == 0 else []) + [part], past, step.live_after))
        pending = []
    if pending or not stages:
        stages.append(Stage(pending, len(stages) + 1, {plan.output_id}))
    return stages


class StreamContext(RunContext):
    """A RunContext whose last op's compaction is left to the queue: where rows leave at an
    exit, the staying rows are only marked (`pending`), and the next stage gathers them from
    these values with its other rows in one copy."""

    lazy = False  # set for a stage's last op
    pending: torch.Tensor | None = None  # positions of the current rows among the values
    before: torch.Tensor | None = None  # the row map when they were marked

    def settle(self) -> None:
        """Carry out the compaction left to the queue (the rows go on in this run after all),
        as `RunContext.keep` would have done it then."""
        rows, self.idx = self.pending, self.before
        self.pending = self.before = None
        super().keep(rows, set(self.env))

    def keep(self, rows: torch.Tensor, live_ids: set[str]) -> None:
        if not self.lazy or self.pending is not None:
            return super().keep(rows, live_ids)
        self.rows, self.before, self.pending = rows.shape[0], self.idx, rows
        self.idx = rows if self.idx is None else self.idx.index_select(0, rows)
        self.env = {k: v for k, v in self.env.items() if k in live_ids}


class Log:
    """A stream's log, what `Trace` reads off a RunContext: each stage run's records, their
    rows translated to stream ids when the trace first reads them."""

    compacting, width = True, 1

    def __init__(self, device, shape: tuple) -> None:
        self.batch, self.device = 0, device
        self.input = torch.empty((0, *shape))  # (the trace reads the positions off it)
        self.runs: list[tuple[torch.Tensor, list, list, list]] = []
        self.query_padding: list = []
        self._done: tuple[list, list, list] | None = None

    @property
    def samples(self) -> int:
        return self.batch

    def add(self, ids: torch.Tensor, ctx) -> None:
        self.runs.append((ids, ctx.events, ctx.decisions, ctx.tokens))
        self.query_padding += ctx.query_padding

    def _translated(self) -> tuple[list, list, list]:
        if self._done is None:
            ev, dec, tok = [], [], []
            for ids, events, decisions, tokens in self.runs:

                def g(rows, ids=ids):
                    return ids if rows is None else ids.index_select(0, rows)

                ev += [(u, g(r), w) for u, r, w in events]
                dec += [(f, c, g(r), w, v) for f, c, r, w, v in decisions]
                tok += [(u, nm, g(r), v, kd) for u, nm, r, v, kd in tokens]
            self._done = (ev, dec, tok)
        return self._done

    @property
    def events(self) -> list:
        return self._translated()[0]

    @property
    def decisions(self) -> list:
        return self._translated()[1]

    @property
    def tokens(self) -> list:
        return self._translated()[2]


def last_of(pieces: list[tuple[torch.Tensor, object]], n: int) -> torch.Tensor:
    """[n] for each id in 0..n-1, the position of its last occurrence in the ids of `pieces`
    ((ids, value) in order), counted over all of them."""
    ids = torch.cat([i for i, _ in pieces])
    order = torch.arange(ids.shape[0], device=ids.device)
    return torch.full((n,), -1, dtype=torch.long, device=ids.device).scatter_reduce_(
        0, ids, order, "amax"
    )


# After a per-token exit, each row (sequence) carries its tokens' state (runtime/token_rows.py)
# from stage to stage among its states, under these names
_TOKENS = {"active": "token_rows.active", "exit_at": "token_rows.exit_at", "out": "token_rows.out"}


def _tokens_in(ctx) -> None:
    """A stage after a per-token exit: its rows' tokens' state, from their states."""
    if _TOKENS["active"] in ctx.states:
        t = {k: ctx.states.pop(name) for k, name in _TOKENS.items()}
        ctx.token_rows = TokenRows(**t, everyone=bool(t["active"].all()))


def _tokens_out(ctx, n: int) -> dict[str, torch.Tensor]:
    """The states of the values' `n` rows, with their tokens' state after a per-token exit.
    The exit compacted that state to the rows that go on (`TokenRows.keep`); where the values'
    own compaction is left to the queue (`pending`), it is put back at those rows' positions
    (a few small tensors), so that one gather moves everything."""
    t = ctx.token_rows
    if t is None:
        return ctx.states
    state = {name: getattr(t, k) for k, name in _TOKENS.items()}
    if ctx.pending is not None:
        state = {
            k: v.new_zeros((n, *v.shape[1:])).index_copy_(0, ctx.pending, v)
            for k, v in state.items()
        }
    return ctx.states | state


_NOTHING = torch.empty(0)  # the input of a run that does not read it (nothing to protect)


class Lane:
    """The queues of one stream of rows of one shape (a sequence model: of one length)."""

    def __init__(
        self, model, stages: list[Stage], shape: tuple, device, log_rows: bool, batch_size: int
    ) -> None:
        self.model, self.stages, self.b = model, stages, batch_size
        self.queues = [Queue() for _ in stages]
        self.n = 0  # rows admitted
        self.where: list[torch.Tensor] = []  # their ids in the whole stream, by admission
        # (ids, outputs) of every run where rows took outputs, in order: a row that goes on
        # is written again where it leaves (as RunContext.leave), so later pieces win
        self.out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done: list[tuple[torch.Tensor, float]] = []  # (ids, time) of each stage run
        self.log = Log(device, shape)
        self.log_rows = log_rows

    def admit(self, x: torch.Tensor, where: torch.Tensor) -> None:
        ids = torch.arange(self.n, self.n + x.shape[0], device=x.device)
        self.n += x.shape[0]
        self.where.append(where)
        self.queues[0].push(Rows(ids, {"input": x}, {}), None)

    def run(self, k: int, n: int) -> None:
        """Stage `k` on the first `n` rows of its queue, and on through the next stages while
        the rows that go on nearly fill a batch (`_through`): the next queue would only add a
        few rows to them at the price of copying them all (a per-token exit where no sequence
        leaves, most of them in a trained model; early exits that keep 7/8 of the rows). Rows
        waiting in that queue wait for the next that arrive."""
        rows = self.queues[k].pop(n)
        plan = self.model._plan
        x = next(iter(rows.env.values()))
        ctx = StreamContext(x, "infer", plan.trace_sizes, out_column=plan.out_column)
        ctx.env, ctx.states = dict(rows.env), dict(rows.states)
        ctx.input = rows.env.get("input", _NOTHING)
        _tokens_in(ctx)
        while True:
            stage = self.stages[k]
            route, last = None, len(stage.ops) - 1
            for j, op in enumerate(stage.ops):
                if not ctx.rows:
                    break
                ctx.lazy = j == last
                route = op(ctx)
            if not self._through(k, ctx, route):
                break
            k += 1
        self.log.add(rows.ids, ctx)
        if self.log_rows:
            self.done.append((rows.ids, time.perf_counter()))
        if ctx.out is not None:  # rows took outputs at an exit
            self.out.append((rows.ids, ctx.out))
        if not ctx.rows:
            return
        # the values' rows (before a pending compaction) and the current rows among them
        at, pos = (ctx.idx, None) if ctx.pending is None else (ctx.before, ctx.pending)
        ids = rows.ids if at is None else rows.ids.index_select(0, at)
        here = Rows(ids, ctx.env, _tokens_out(ctx, ids.shape[0]))
        if route is None:
            return self._send(here, k + 1, pos, stage)
        rest = route.pop(None, None)  # the part may name the rows going past itself
        if rest is None:
            sent = torch.zeros(ctx.rows, dtype=torch.bool, device=x.device)
            for p in route.values():
                sent[p] = True
            rest = torch.where(~sent)[0]
        for offset, p in route.items():
            self._send(here, k + offset, p if pos is None else pos.index_select(0, p), stage)
        self._send(here, stage.past, rest if pos is None else pos.index_select(0, rest), stage)

    def _through(self, k: int, ctx, route) -> bool:
        """Whether the rows of a run of stage `k` go on into stage k + 1 in the same run: a
        nearly full batch of them (7/8; their compaction, if rows left, is carried out now),
        after a stage that routes no rows itself (a loop's ponder part does: the rows going
        round wait in its queue). A halting node's entry goes on into its first step."""
        if route is not None or k + 1 >= len(self.stages) or 8 * ctx.rows < 7 * self.b:
            return False
        if ctx.pending is not None:
            ctx.settle()
        return True

    def _send(self, here: Rows, to: int, pos: torch.Tensor | None, stage: Stage) -> None:
        """The rows of `here` at `pos` (None: all) wait for stage `to` now (past the last
        stage: they are done, with the plan's output)."""
        if to >= len(self.stages):
            if pos is None or pos.shape[0]:
                v = self.model._plan.output_id
                self.out.append(
                    (here.ids, here.env[v])
                    if pos is None
                    else (here.ids.index_select(0, pos), here.env[v].index_select(0, pos))
                )
            return
        # past the node, rows keep what is read after it; within it, everything
        keep = stage.live if to == stage.past else None
        env = here.env if keep is None else {k: v for k, v in here.env.items() if k in keep}
        self.queues[to].push(Rows(here.ids, env, here.states), pos)

    def held(self) -> int:
        return sum(q.rows for q in self.queues)

    def result(self, lengths: torch.Tensor | None) -> DynamicOutput:
        """Outputs and trace of the lane's rows, in admission order."""
        logits = torch.cat([v for _, v in self.out]).index_select(0, last_of(self.out, self.n))
        self.log.batch = self.n
        return DynamicOutput(
            logits, Trace(self.log, len(self.model.units), self.model.paths, lengths)
        )
