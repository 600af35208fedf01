"""Streaming: a stream of inputs run without cutting it into independent batches (DESIGN §10).

A per-batch pass runs each stage after a decision on the rows that continue, so deep stages run
small GEMMs, which this kind of CPU runs at a fraction of its rate. `stream` pools rows across
inputs instead: the plan is cut into **stages** where rows leave or loop, each stage keeps a
queue of rows waiting for it, and a stage runs only when its queue holds `batch_size` rows (or
when the input has ended), so every stage runs full batches. (Rows that go on past a stage
and still fill 7/8 of a batch go on in the same run instead: stream_lane.Lane._through.)

- A stage ends after every node where rows leave (an exit); the nodes before it (segments,
  gates, metalayers) run inside the stage, on all its rows, as in a batched pass. A construct
  may split its node into parts of their own (`stream_parts(pool_bodies)` on its runtime): a
  halting node's ponder step is a part that sends the rows that go on back to its own queue,
  where new rows join them (continuous batching); with `pool_bodies`, a gate's body gets a
  queue of its own, so that it runs full batches of the rows that take it.
- Each run of a stage is an ordinary infer pass over those rows (a RunContext that starts with
  their live values), so every construct's infer code runs unchanged; the pass's log is
  translated to stream row ids afterwards, and the trace over the whole stream is built from
  it. Rows are independent in infer mode, so outputs and traces equal those of each input run
  alone (up to float rounding of different batch compositions).
- Memory is bounded: the rows waiting in all queues never pass `max_rows`; before more input is
  admitted, the deepest non-empty queue runs, even short of a full batch, until there is room.
- A sequence model streams each length separately (as `DynamicModel.forward` groups a batch by
  length). A per-token exit ends a stage like any exit (the sequences with no running token
  leave there); the sequences that go on carry their tokens' state (which tokens run, where
  each left, the outputs of those that did) among their states, so the layers after it run
  full batches of sequences pooled across inputs too.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .lengths import groups, lengths_of
from .model import merged_output
from .stream_lane import Lane, last_of, stages_of
from .trace import Trace


class StreamOutput:
    """What `stream` returns.

    Attributes:
        logits: [N, ...] each input's output, in input order.
        trace: the per-input record of decisions and executed units, as a batched pass's.
        latency: [N] seconds from each input's entry (when the stream took it) to its result
            (worked out from the stream's log when first read).
        stats: inputs, seconds, throughput (inputs/s), latency p50 / p99 (ms), batch_size,
            max_rows, peak_rows (most rows ever waiting in the queues), runs (stage runs) and
            full_runs (those on `batch_size` rows).
    """

    def __init__(self, logits: torch.Tensor, trace: Trace, streamer, stats: dict[str, Any]):
        self.logits, self.trace = logits, trace
        self._streamer, self._stats, self._latency = streamer, stats, None

    @property
    def latency(self) -> torch.Tensor:
        if self._latency is None:
            self._latency = self._streamer.latency()
        return self._latency

    @property
    def stats(self) -> dict[str, Any]:
        if "latency_p50_ms" not in self._stats:
            timed = self._streamer.log_rows
            p50, p99 = percentiles_ms(self.latency) if timed else (None, None)
            self._stats.update(latency_p50_ms=p50, latency_p99_ms=p99)
        return self._stats


def percentiles_ms(seconds: torch.Tensor) -> tuple[float, float]:
    """(p50, p99) of per-input latencies in seconds, in milliseconds."""
    q = (seconds.double() * 1e3).quantile(torch.tensor([0.5, 0.99], dtype=torch.float64))
    return float(q[0]), float(q[1])


class Streamer:
    """The queues of a stream and the order in which they run (see the module's docstring)."""

    def __init__(
        self, model, batch_size: int, max_rows: int, log_rows: bool = True, pool_bodies=False
    ) -> None:
        self.model, self.b, self.max_rows = model, batch_size, max_rows
        self.stages = stages_of(model._plan, pool_bodies)
        self.lanes: dict[int, Lane] = {}
        self.n, self.peak, self.runs, self.full = 0, 0, 0, 0
        self.entered: list[tuple[torch.Tensor, float]] = []
        self.log_rows = log_rows

    def _lane(self, key: int, shape: tuple, device) -> Lane:
        if key not in self.lanes:
            self.lanes[key] = Lane(self.model, self.stages, shape, device, self.log_rows, self.b)
        return self.lanes[key]

    def held(self) -> int:
        return sum(lane.held() for lane in self.lanes.values())

    def _run(self, lane: Lane, k: int) -> None:
        n = min(self.b, lane.queues[k].rows)
        self.runs += 1
        self.full += n == self.b
        lane.run(k, n)

    def _deepest(self, at_least: int) -> tuple[Lane, int] | None:
        best = None
        for lane in self.lanes.values():
            for k in range(len(self.stages) - 1, -1, -1):
                if lane.queues[k].rows >= at_least:
                    if best is None or k > best[1]:
                        best = (lane, k)
                    break
        return best

    def admit(self, x: torch.Tensor, lengths: torch.Tensor | None) -> None:
        """Take inputs `x` (checked, at most `batch_size` rows) into the stream."""
        while self.held() + x.shape[0] > self.max_rows:  # make room: the deepest rows first
            self._run(*self._deepest(1))
        ids = torch.arange(self.n, self.n + x.shape[0])
        self.n += x.shape[0]
        if self.log_rows:
            self.entered.append((ids, time.perf_counter()))
        if lengths is None:
            self._lane(0, tuple(x.shape[1:]), x.device).admit(x, ids)
        else:
            for length, rows in groups(lengths):
                part = x.index_select(0, rows)[:, :length]
                self._lane(length, tuple(part.shape[1:]), x.device).admit(part, ids[rows.cpu()])
        self.peak = max(self.peak, self.held())
        while (got := self._deepest(self.b)) is not None:  # every full queue, deepest first
            self._run(*got)

    def finish(self) -> None:
        """The input has ended: every queue runs out, shallowest first (so that rows pool in
        the deeper queues), in batches of at most `batch_size`."""
        for lane in self.lanes.values():
            for k in range(len(self.stages)):
                while lane.queues[k].rows:
                    self._run(lane, k)

    def result(self, lengths: torch.Tensor | None, per_token: bool, full: int):
        """The outputs and trace in input order."""
        keys = sorted(self.lanes)
        parts = [
            self.lanes[k].result(None if lengths is None else torch.full((self.lanes[k].n,), k))
            for k in keys
        ]
        if lengths is None:
            return parts[0]
        return merged_output(
            parts, [torch.cat(self.lanes[k].where) for k in keys], lengths, full, per_token
        )

    def latency(self) -> torch.Tensor:
        """[N] seconds from each input's entry to the end of the run it left in (zeros when
        the stream kept no times)."""
        latency = torch.zeros(self.n, dtype=torch.float64)
        if not self.log_rows:
            return latency
        t_in = torch.cat(
            [torch.full((len(ids),), t, dtype=torch.float64) for ids, t in self.entered]
        )
        for lane in self.lanes.values():  # each row's last run is the one it left in
            t_out = torch.tensor([t for _, t in lane.done], dtype=torch.float64)
            sizes = torch.tensor([len(ids) for ids, _ in lane.done])
            t_out = t_out.repeat_interleave(sizes).index_select(0, last_of(lane.done, lane.n))
            latency.index_copy_(0, torch.cat(lane.where).cpu(), t_out)
        return latency - t_in


def _pieces(model, inputs: Any, b: int, lengths: Any):
    """(checked inputs of at most `b` rows, their lengths or None), in order."""
    seq = model._seq
    if isinstance(inputs, torch.Tensor) or type(inputs).__module__ == "numpy":
        inputs = [inputs]
    elif lengths is not None:
        raise ValueError(f"{model.name}: lengths go with one tensor of inputs")
    for item in inputs:
        x = model._checked_input(item)
        n = None if seq is None else lengths_of(x, seq[0], lengths, model.name)[0]
        for i in range(0, x.shape[0], b):
            yield x[i : i + b], None if n is None else n[i : i + b]


def stream(
    model,
    inputs: Any,
    batch_size: int = 256,
    max_rows: int | None = None,
    lengths: Any = None,
    latency: bool = True,
    pool_bodies: bool = False,
) -> StreamOutput:
    """Run a stream of inputs in infer mode, every stage on full batches (DESIGN §10).

    Args:
        model: a DynamicModel, run in infer mode and eval mode (its `training` flag is
            restored afterwards).
        inputs: a tensor [N, *input.shape], or an iterable of such tensors (batches of any
            size, a generator; of a DataLoader of (x, y), its inputs: `(x for x, _ in
            loader)`), each checked as `model(x)` checks it.
        batch_size: the rows each stage runs at once.
        max_rows: the most rows that may wait in the queues together (default 16 x
            batch_size); at least batch_size.
        lengths: float sequences: [N] lengths, with one tensor of inputs (as `model(x,
            lengths=...)`).
        latency: record each input's entry and result times (one clock read per stage run).
        pool_bodies: gates' bodies get queues of their own too (full batches of the rows that
            take them, at the price of copying every row at every gate; off: they run in
            place, as in a batched pass).

    Returns:
        StreamOutput: outputs and trace in input order, per-input latency and the stream's
        statistics. Outputs and traces equal those of each input run alone.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    max_rows = 16 * batch_size if max_rows is None else max_rows
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < batch_size:
        raise ValueError(
            f"max_rows must be an integer >= batch_size ({batch_size}), got {max_rows!r}"
        )
    s = Streamer(model, batch_size, max_rows, latency, pool_bodies)
    t0, training = time.perf_counter(), model.training
    if training:  # (infer mode: dropout and the like off, as `model.eval()(x)`; the walk
        model.eval()  # over every module costs ~1 ms, so not when it is in eval mode)
    try:
        with torch.no_grad():
            seen_lengths = []
            for x, n in _pieces(model, inputs, batch_size, lengths):
                s.admit(x, n)
                if n is not None:
                    seen_lengths.append(n)
            s.finish()
    finally:
        if training:
            model.train()
    if s.n == 0:
        raise ValueError(f"{model.name}: the stream held no inputs")
    n = torch.cat(seen_lengths) if seen_lengths else None
    full = model._in_shape[0] if n is not None else 0
    out = s.result(n, model.spec.task.per == "token", full)
    seconds = time.perf_counter() - t0
    stats = {
        "inputs": s.n,
        "seconds": seconds,
        "throughput": s.n / seconds,
        "batch_size": batch_size,
        "max_rows": max_rows,
        "peak_rows": s.peak,
        "runs": s.runs,
        "full_runs": s.full,
    }
    return StreamOutput(out.logits, out.trace, s, stats)


def infer_pass(
    model, x: torch.Tensor, batch_size: int, streamed: bool, max_rows: int | None = None
) -> tuple[list, dict]:
    """The outputs of one infer pass over `x` (streamed, or in independent batches), and its
    statistics: how it ran, throughput, per-input latency from entry to result (per batch:
    each input's batch's time). A compiled model first runs a few batches, untimed, so that
    its units have compiled for the sizes they meet (eager units have nothing to warm: the
    pass runs once). `max_rows`: the stream's bound on waiting rows."""
    if model.backend != "none":
        warm = x[: 3 * batch_size]
        if streamed:
            stream(model, warm, batch_size=batch_size, max_rows=max_rows, latency=False)
        else:
            for i in range(0, warm.shape[0], batch_size):
                model(warm[i : i + batch_size])
    if streamed:
        out = stream(model, x, batch_size=batch_size, max_rows=max_rows)
        st = {k: out.stats[k] for k in ("throughput", "latency_p50_ms", "latency_p99_ms")}
        return [out], {"mode": "stream", "batch_size": batch_size, **st,
                       "peak_rows": out.stats["peak_rows"], "max_rows": out.stats["max_rows"]}  # fmt: skip
    outs, times, t0 = [], [], time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        t = time.perf_counter()
        outs.append(model(x[i : i + batch_size]))
        times += [time.perf_counter() - t] * outs[-1].logits.shape[0]
    p50, p99 = percentiles_ms(torch.tensor(times))
    return outs, {"mode": "per_batch", "batch_size": batch_size,
                  "throughput": x.shape[0] / (time.perf_counter() - t0),
                  "latency_p50_ms": p50, "latency_p99_ms": p99}  # fmt: skip
