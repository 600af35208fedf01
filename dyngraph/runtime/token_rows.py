"""Tokens that stop while others go on: the layers after a per-token exit (CALM).

A `per: token` exit lets each token of a sequence leave on its own; a token that left keeps
its state (frozen). Every layer after the graph's first per-token exit is then its own plan
step, a `RowsStep`, that updates only the tokens still running:
- a block that computes each token alone (`Unit.per_token`: norms, MLPs, heads) runs on the
  running tokens of every sequence in one [1, N, D] call;
- a block with partial queries (`forward_rows`: attention, transformer_block) computes keys
  and values for every token from its current state (a frozen token's is its state at its
  exit) and everything else for the running tokens only; attention runs per sample, each
  sample's queries in blocks (`QueryGrid.attend`: runtime/attention.cpp), or on a query grid
  padded per sample where that kernel does not apply.
Dense mode gives the same answer by a masked update, `where(running, block(x), x)`: every
token computed, the frozen ones' results dropped. Train mode runs every token through every
layer (CALM and LayerSkip train each exit on every token).

Costs, per token (exact; runtime/lengths.py): a running token at position i pays what the
unit costs a sequence of i + 1 tokens beyond one of i (its keys, query, MLP, and attention
over the i + 1 keys it reads under a causal mask; without one, an equal share of the
whole); a frozen token pays its keys and values (`frozen_macs`). What attention computes
past the keys each query reads (a block's, or the padded grid's) is the only waste, reported
on the trace (`trace.query_padding_macs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels


@dataclass
class TokenRows:
    """Which tokens of the current rows still run, what the ones that left output, and where
    they left (one per infer or dense pass, on `ctx.token_rows`).

    Attributes:
        active: [rows, L] bool, the tokens still running.
        exit_at: [rows, L] long, the exit each token left at (-1: still running).
        out: [rows, L, C] the outputs of the tokens that left (None before any did).
    """

    active: torch.Tensor
    exit_at: torch.Tensor
    out: torch.Tensor | None = None
    _flat: torch.Tensor | None = field(default=None, repr=False)
    _grid: Any = field(default=None, repr=False)
    _kept: tuple | None = field(default=None, repr=False)  # (value, version, its running rows)
    everyone: bool = True  # every token of every row runs (no index is needed)

    @classmethod
    def start(cls, x: torch.Tensor) -> TokenRows:
        b, n = x.shape[:2]
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        return cls(active, torch.full((b, n), -1, dtype=torch.long, device=x.device))

    @property
    def flat(self) -> torch.Tensor:
        """[N] the running tokens' rows of a [rows·L, D] view, in order."""
        if self._flat is None:  # (the query grid's rows are these, where it is built)
            g = self._grid
            self._flat = self.active.reshape(-1).nonzero().flatten() if g is None else g.rows
        return self._flat

    @property
    def grid(self):
        """The running tokens' query grid (blocks/sequence.py), built once per running set."""
        if self._grid is None:
            self._grid = grid_of(self.active)
        return self._grid

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The running tokens' rows [N, D] of `x` [rows, L, D]: the rows a layer just wrote
        where `x` is its output, unchanged since (no gather); else gathered."""
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == x._version:
            return kept[2]
        b, n, d = x.shape
        return x.reshape(b * n, d).index_select(0, self.flat)

    def stop(self, leaving: torch.Tensor, where: int) -> None:
        """The tokens at flat rows `leaving` leave at exit `where`. New tensors, not in place:
        the trace's log holds the old ones (no copy per record)."""
        shape = self.active.shape
        self.marked(
            self.active.view(-1).index_fill(0, leaving, False).view(shape),
            self.exit_at.view(-1).index_fill(0, leaving, where).view(shape),
        )

    def marked(self, active: torch.Tensor, exit_at: torch.Tensor) -> None:
        """Some tokens left: `active` and `exit_at` mark them (new tensors: `stop`'s, or the
        fused kernel's)."""
        self.active, self.exit_at = active, exit_at
        self._flat = self._grid = self._kept = None
        self.everyone = False

    def keep(self, rows: torch.Tensor) -> None:
        """Infer: only the rows at positions `rows` go on."""
        self.active, self.exit_at = self.active[rows], self.exit_at[rows]
        self.out = None if self.out is None else self.out[rows]
        self._flat = self._grid = self._kept = None


# Attention per sample from this length on. Below it a padded grid wastes little (a causal
# mask's share grows with L) and one SDPA call beats 2 x heads BLAS calls per block of each
# sample: calm_tagger (L = 16) ran 1.09-1.12x slower per sample where most tokens run, the
# token benchmarks' model 0.96-1.02x at L = 64 and 0.90-0.93x at L = 256 (same-run A/Bs).
PER_SAMPLE_FROM = 64


def grid_of(active: torch.Tensor):
    """The query grid of the running tokens `active` [b, L] (blocks/sequence.py's
    `QueryGrid`): where the kernels apply and L >= PER_SAMPLE_FROM, their rows, positions and
    offsets for attention per sample (`query_rows`, attention.cpp), or else the padded grid in
    one call of the fused kernel (~15 ATen ops, 0.3 ms at B = 32, L = 64 here, otherwise)."""
    from ..blocks.sequence import QueryGrid, query_grid

    k = kernels.for_device(active.device)
    if kernels.per_sample(k) and active.shape[1] >= PER_SAMPLE_FROM:
        rows, pos, offsets, width = k.query_rows(active)
        return QueryGrid(rows, None, width, None, k, pos, offsets)
    if k is None or torch.get_default_dtype() != torch.float32:
        return query_grid(active)
    rows, slots, mask, width = k.query_grid(active)
    return QueryGrid(rows, slots, width, mask, k)


@dataclass
class RowsStep:
    """One layer after a per-token exit: it updates the running tokens only (module doc)."""

    unit: Any  # a compiler Unit: the layer as a one-node segment
    block: Any  # the layer's module (`forward_rows` where it mixes positions)
    reads: list[str]
    outputs: list[str]
    live_after: set[str] = field(default_factory=set)

    @property
    def writes(self) -> str:
        return self.outputs[0]

    @property
    def name(self) -> str:
        return self.unit.name

    def run(self, ctx) -> None:
        x, t = ctx.env[self.reads[0]], ctx.token_rows
        if ctx.compacting:
            live = [ctx.env[k] for k in self.live_after if k in ctx.env]
            ctx.env[self.writes] = self.apply(ctx, x, live)
            return
        y = ctx.call(self.unit, x)[0]
        if ctx.mode == "dense":  # the frozen tokens keep their states (train: every token runs)
            y = torch.where(t.active.unsqueeze(-1), y, x)
        self._record(ctx, t)
        ctx.env[self.writes] = y

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner/tokens.py runs it)."""
        return {"kind": "token_rows", "unit": self.unit.index, "per_token": self.unit.per_token,
                "reads": list(self.reads), "writes": self.writes}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `apply`."""
        x, live = g.var(self.reads[0]), g.values(g.live(self.live_after))
        g.assign(self.writes, f"{g.bind(self, self.unit.name)}.apply(ctx, {x}, [{live}])")

    def apply(self, ctx, x: torch.Tensor, live: list[torch.Tensor]) -> torch.Tensor:
        """Infer: the layer's output for the current rows, the running tokens updated (in
        `x` itself where nothing in `live`, the values read later, shares its memory)."""
        t = ctx.token_rows
        self._record(ctx, t)
        if t.everyone:
            return ctx.call(self.unit, x)[0]
        b, n, d = x.shape
        grid = None if self.unit.per_token else t.grid  # (first: its rows are `flat`)
        flat = t.flat
        ctx.events.append((self.unit.index, ctx.idx, None))  # (ctx.call's log)
        if self.unit.per_token:
            new = self.unit(x.reshape(b * n, d).index_select(0, flat).view(1, -1, d))[0]
        else:
            new = self.block.forward_rows(x, grid)
            ctx.query_padding.append((self.block, t.active, t.grid.padded))  # (counted later)
        t._kept = None  # (y may be x: its rows change now)
        y = x if ctx.free(x, live) else x.clone()
        new = new.reshape(-1, d)
        ctx.put(y.view(b * n, d), flat, new)  # (one memcpy per row)
        if new.is_contiguous():  # an exit reading y next takes these rows without a gather
            t._kept = (y, y._version, new)
        return y

    def _record(self, ctx, t: TokenRows) -> None:
        kind = "routed" if self.unit.per_token else "queries"
        ctx.record_tokens(self.unit.index, f"{self.unit.name} tokens", t.active, kind)


def padding_macs(log: list[tuple]) -> int:
    """The MACs the running tokens' attention of a pass computed past what its queries read
    (`ctx.query_padding`: (block, running tokens [b, L], padded grid width or None) per call):
    per sample (`QueryGrid.attend`), the keys a block of queries reads past its earlier
    queries' positions; on a padded grid, the padded query slots, and under a causal mask the
    keys a query reads past its own position (SDPA with a mask computes every pair). Counted
    when the trace is read, not on the hot path."""
    from ..blocks.sequence import blocked_pairs

    total = 0
    for block, active, width in log:
        attn = getattr(block, "attn", block)
        b, n = active.shape
        if attn.causal:  # the pairs the running queries need
            read = int(((torch.arange(n, device=active.device) + 1) * active).sum())
        else:
            read = int(active.sum()) * n
        if width is None:
            counts = active.sum(1)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            computed = blocked_pairs(active.nonzero()[:, 1], offsets, n, attn.causal)
        else:
            computed = b * width * n
        total += (computed - read) * 2 * attn.dim
    return total  # QK and AV: d_head per pair and head, over every head
