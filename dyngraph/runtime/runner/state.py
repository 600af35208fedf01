"""The state of one pass of the runner (runtime/runner) over rows: the current rows and values,
the log of unit calls and decisions the trace is built from, and the row gathers and writes
the steps (steps.py, tokens.py) do, through the export's fused kernels where they apply
(fused.py). Imports nothing but torch."""

from __future__ import annotations

import torch


class Pass:
    """The state of one pass over rows (as dyngraph's RunContext in infer mode). Unit calls
    and decisions are logged with the row map of the time; the trace is built from the log
    when first read."""

    def __init__(self, model, x: torch.Tensor):
        b = x.shape[0]
        self.m, self.batch, self.rows = model, b, b
        self.k = model.kernels if x.device.type == "cpu" else None  # (runner/fused.py)
        self.idx: torch.Tensor | None = None  # the original row of each current row
        self.env: dict[str, torch.Tensor] = {"input": x}
        self.states: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None
        self.calls: list[tuple] = []  # (unit, row map, positions among its rows or None)
        # (unit, row map, [rows] tokens): a unit that ran on some tokens of each sequence as a
        # shorter sequence costs its cost at that many tokens (Mixture-of-Depths)
        self.routed: list[tuple] = []
        self.decisions: list[tuple] = []  # (column, node, values, row map, positions)
        # (unit, row map, [rows, L]: 1 ran its query, 0 a key and a value only): partial
        # queries after a per-token exit or halting (runner/tokens.py); each token's own cost
        self.queries: list[tuple] = []
        self.every_token = True  # no token has left a per-token exit yet
        self.length = x.shape[1] if x.dim() > 1 else 0

    def trace(self, macs: torch.Tensor) -> tuple:
        """(columns, unit counts, MACs per input) from the log."""
        b, m = self.batch, self.m
        counts = torch.zeros(b, len(m.units), dtype=torch.long)
        for u, g in ((u, _rows_of(idx, rows)) for u, idx, rows in self.calls):
            if g is None:
                counts[:, u] += 1
            else:
                counts[g.cpu(), u] += 1
        columns = {
            c["name"]: torch.full(
                (b,) if c["width"] is None else (b, c["width"]), c["empty"], dtype=torch.long
            )  # fmt: skip
            for c in m.manifest["columns"]
        }
        for name, col, values, idx, rows in self.decisions:
            g = _rows_of(idx, rows)
            target = columns[name] if col is None else columns[name][:, col]
            values = values() if callable(values) else values  # (made when the trace is read)
            v = values.cpu().long() if torch.is_tensor(values) else values
            if g is None:
                target[:] = v
            else:
                target[g.cpu()] = v
        cost = counts * macs
        if self.routed:  # (a sequence model: the manifest has each unit's MACs per length)
            table = torch.tensor(m.macs_by_length, dtype=torch.long)
            for u, idx, k in self.routed:
                g = slice(None) if idx is None else idx.cpu()
                cost[g, u] = counts[g, u] * table[k.cpu(), u]
        for u in {u for u, _, _ in self.queries}:
            cost[:, u] = 0
        for u, idx, running in self.queries:
            share, frozen = _token_shares(m, u, self.length)
            per = torch.where(running == 1, share, torch.where(running == 0, frozen, 0))
            cost[slice(None) if idx is None else idx.cpu(), u] += per.cpu().sum(1)
        return columns, counts, cost.sum(1)

    def call(self, u: int, *args: torch.Tensor, rows: torch.Tensor | None = None):
        self.calls.append((u, self.idx, rows))
        return self.m.units[u](*args)

    def record(self, name: str, col: int | None, values, rows: torch.Tensor | None = None):
        self.decisions.append((name, col, values, self.idx, rows))

    def leave(self, out: torch.Tensor, where: int) -> None:
        """Every current row takes `out` (taken at exit `where`); rows that go on are written
        again where they leave."""
        self.record(self.m.out_column, None, where)
        if self.out is None and self.idx is None:  # every row: a unit's fresh output, kept
            self.out = out  # (later exits write their rows into it)
            return
        if self.out is None:
            self.out = out.new_zeros((self.batch, *out.shape[1:]))
        self.put(self.out, self.idx, out)

    def keep(self, rows: torch.Tensor, live: list[str]) -> None:
        """Only the rows at positions `rows` go on: the live values, the states and the row
        map compacted to them (one kernel call where the kernels apply)."""
        self.rows = rows.shape[0]
        env = [k for k in self.env if k in live]
        values = [self.env[k] for k in env] + list(self.states.values())
        got = self.gather([*values, self.idx] if self.idx is not None else values, rows)
        self.env = dict(zip(env, got[: len(env)], strict=True))
        self.states = dict(zip(self.states, got[len(env) : len(values)], strict=True))
        self.idx = rows if self.idx is None else got[-1]

    def gather(self, values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
        """The rows at positions `rows` of every value (as dyngraph's RunContext.gather)."""
        if self.k is not None and len(values) > 1:
            return self.k.gather_rows(values, rows)
        return [v.index_select(0, rows) for v in values]

    def put(self, dst: torch.Tensor, rows: torch.Tensor | None, src: torch.Tensor,
            src_rows: torch.Tensor | None = None) -> None:  # fmt: skip
        """`dst[rows] = src[src_rows]` in place (None: every row, in order), one memcpy per
        row where the kernels apply (as dyngraph's RunContext.put)."""
        k = self.k
        if k is not None and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
            k.copy_rows_(dst, rows, src, src_rows)
            return
        if src_rows is not None:
            src = src.index_select(0, src_rows)
        if rows is None:
            dst.copy_(src)
        else:
            dst.index_copy_(0, rows, src)


def _token_shares(m, u: int, n: int) -> tuple[torch.Tensor, int]:
    """([n] what a running token at each position of a length-n sequence pays in unit `u`
    run with partial queries, what a frozen one pays: its keys and values), as dyngraph's
    runtime/lengths.py: C(i + 1) - C(i) under a causal mask (C: the cost at a length), else an
    equal share of C(n) beyond the frozen cost, a remainder to the last."""
    if (u, n) in m.token_shares:  # (every record of every pass reads it)
        return m.token_shares[u, n]
    info = m.manifest["token_costs"][str(u)]
    frozen = info["frozen"]
    c = [m.macs_by_length[i][u] for i in range(n + 1)]
    if info["causal"]:
        share = torch.tensor([c[i + 1] - c[i] for i in range(n)])
    else:
        each, rest = divmod(c[n] - n * frozen, n)
        share = torch.full((n,), frozen + each)
        share[-1] += rest
    m.token_shares[u, n] = share, frozen
    return share, frozen


def _rows_of(idx: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The original rows of positions `rows` among the rows of row map `idx` (None: all)."""
    if rows is None:
        return idx
    return rows if idx is None else idx.index_select(0, rows)
