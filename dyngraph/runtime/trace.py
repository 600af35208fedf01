"""The per-sample record of a forward pass, and the table of distinct paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def _rows(batch: int, rows: torch.Tensor | None, where, compacting: bool, device):
    """The samples a logged call or decision stands for: None (all of them), sample indices
    (infer) or a mask (dense/train)."""
    if compacting:  # rows: the row map then (None: identity); where: positions among them
        if where is None:
            return rows
        return where if rows is None else rows.index_select(0, where)
    if where is None:  # rows: the live mask then
        return rows
    if where.dtype != torch.bool:
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        mask[where] = True
        where = mask
    return where if rows is None else rows & where


class Trace:
    """What each sample of a batch did. Built from the forward pass's log when first read:
    over the pass's rows (row id = sample x width + position), then folded to samples (a
    per-position column gets a dimension of `width`; unit counts are summed over a sample's
    positions, so that its MACs are the exact sum over its tokens).

    Attributes:
        <column>: one attribute per construct's column group (`trace.exit` [B], `trace.gates`
            [B, G], `trace.choices` [B, M], `trace.steps` [B, H], ...): the construct's decision
            at each of its nodes, or its `empty` value where the sample never reached the node.
        path_id: [B] the id of the sample's path (a tuple of all its decisions) in the model's
            PathTable; a path's cost is static.
        unit_counts: [B, U] how many times each sample executed each unit of the model.
        lengths: [B] each sequence's length (a sequence model), else None; part of the path.
        tokens: {decision name: [B, L]} for per-token decisions: a `per: token` gate's 1 where
            the token ran the node's body, 0 where it did not; halting through time, the
            ponder steps of each position; -1 for padding and samples that never reached it.
        unit_tokens: {unit index: [B, L]} the same, by the unit the tokens ran (as a shorter
            sequence: a sample's cost of that unit is its cost at that many tokens).
    """

    def __init__(self, ctx, n_units: int, paths: PathTable, lengths: torch.Tensor | None = None):
        self._batch, self._device, self._compacting = ctx.batch, ctx.device, ctx.compacting
        self._width, self._samples = ctx.width, ctx.samples
        self._decisions, self._events = ctx.decisions, ctx.events
        self._n_units, self._paths = n_units, paths
        self._fields: dict[str, torch.Tensor] | None = None
        self._path_id: torch.Tensor | None = None
        self._unit_counts: torch.Tensor | None = None
        self._calls: list[tuple[int, int]] | None = None
        self._token_log = ctx.tokens
        self._tokens: dict[str, torch.Tensor] | None = None
        # per-token logs (RunContext.record_tokens): {(unit, name): kind}; units may share
        # a record (halting through time: the step and the halting unit ran as often)
        self._token_kinds = {(u, n): k for u, n, _, _, k in ctx.tokens}
        self._query_padding: list[tuple] | int = ctx.query_padding
        self._positions = ctx.input.shape[1] if ctx.input.dim() > 1 else 0
        self.lengths = lengths

    @classmethod
    def merged(
        cls, parts: list[Trace], order: torch.Tensor, lengths: torch.Tensor, full: int
    ) -> Trace:
        """One trace from the traces of a batch's length groups (runtime/lengths.py); `order`
        puts the concatenated groups back in the batch's order; `full`: the batch's length."""
        from .lengths import merge

        t = object.__new__(cls)
        first = parts[0]
        t._batch, t._device, t._compacting = len(order), first._device, first._compacting
        t._width, t._samples = first._width, len(order)
        t._n_units, t._paths = first._n_units, first._paths
        t._fields = merge([p.columns for p in parts], order, 0)
        t._unit_counts = merge([p.unit_counts for p in parts], order, 0)
        t._path_id = None
        t._calls = [c for p in parts for c in p.unit_calls()]
        t._token_kinds = {k: v for p in parts for k, v in p._token_kinds.items()}
        t._query_padding = sum(p.query_padding_macs for p in parts)
        t._positions = full
        # per-token columns are padded with -1 to the batch's length (and a column a group
        # never wrote, where every token of its sequences left before it, is all -1)
        pad = [
            {
                k: F.pad(p.tokens[k], (0, full - p.tokens[k].shape[1]), value=-1)
                if k in p.tokens
                else torch.full((len(p), full), -1, dtype=torch.long, device=p._device)
                for k in dict.fromkeys(n for _, n in t._token_kinds)
            }
            for p in parts
        ]
        t._tokens = merge(pad, order, full)
        t.lengths = lengths
        return t

    def _build(self) -> dict[str, torch.Tensor]:
        b, dev = self._batch, self._device
        t = {
            g.name: torch.full(
                (b,) if g.width is None else (b, g.width), g.empty, dtype=torch.long, device=dev
            )
            for g in self._paths.groups
        }
        for name, col, rows, where, values in self._decisions:  # in order: later ones win
            target = t[name] if col is None else t[name][:, col]
            sel = _rows(b, rows, where, self._compacting, dev)
            if torch.is_tensor(values):
                values = values.to(torch.long)
            if self._compacting:
                if sel is None:
                    target.copy_(values) if torch.is_tensor(values) else target.fill_(values)
                else:
                    target[sel] = values
            elif sel is not None:
                target.copy_(torch.where(sel, values, target))
            else:
                target.copy_(values) if torch.is_tensor(values) else target.fill_(values)
        return t

    @property
    def tokens(self) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            b, dev, out = self._batch, self._device, {}
            for _, name, rows, mask, _ in self._token_log:
                t = out.get(name)
                if t is None:
                    t = torch.full((b, mask.shape[1]), -1, dtype=torch.long, device=dev)
                sel, v = _rows(b, rows, None, self._compacting, dev), mask.long()
                if sel is None:
                    t = v
                elif self._compacting:
                    t[sel] = v
                else:
                    t = torch.where(sel[:, None], v, t)
                out[name] = t
            self._tokens = out
        return self._tokens

    @property
    def query_padding_macs(self) -> int:
        """MACs the pass wasted on padded query grids (after a per-token exit; 0 otherwise):
        what it executed beyond the per-input MACs."""
        if not isinstance(self._query_padding, int):
            from .token_rows import padding_macs

            self._query_padding = padding_macs(self._query_padding)
        return self._query_padding

    def _of_kind(self, kind: str) -> dict[int, torch.Tensor]:
        return {u: self.tokens[n] for (u, n), k in self._token_kinds.items() if k == kind}

    @property
    def unit_tokens(self) -> dict[int, torch.Tensor]:
        """{unit index: [B, L]} 1 where the token ran the unit, which ran on those tokens as
        a shorter sequence (a Mixture-of-Depths body, a per-token module choice)."""
        return self._of_kind("routed")

    @property
    def token_counts(self) -> dict[int, torch.Tensor]:
        """{unit index: [B, L]} how many times each position ran the unit (halting through
        time: its ponder steps), for units that run a token at a time."""
        return self._of_kind("steps")

    @property
    def unit_queries(self) -> dict[int, list[torch.Tensor]]:
        """{unit index: [[B, L] per run]} 1 where the token ran the unit's queries, 0 where
        it was a key and a value only (frozen after a per-token exit, halted over depth:
        runtime/token_rows.py), -1 where the sample did not run it; one record per run."""
        out: dict[int, list[torch.Tensor]] = {}
        for (u, n), k in self._token_kinds.items():
            if k == "queries":
                out.setdefault(u, []).append(self.tokens[n])
        return out

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        """Row-space values [rows, ...] as [samples, width, ...] (width 1: unchanged)."""
        return t if self._width == 1 else t.view(self._samples, self._width, *t.shape[1:])

    @property
    def columns(self) -> dict[str, torch.Tensor]:
        """Every column group by name, in the model's order ([samples, ...]; a pass over
        positions: [samples, width, ...])."""
        if self._fields is None:
            self._fields = {k: self._fold(v) for k, v in self._build().items()}
        return self._fields

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        if any(g.name == name for g in self._paths.groups):
            return self.columns[name]
        raise AttributeError(f"the trace has no column {name!r}")

    def decisions(self) -> torch.Tensor:
        """[B, D]: every decision of each sample in one row (what defines its path)."""
        cols = [c.flatten(1) if c.dim() > 1 else c[:, None] for c in self.columns.values()]
        if self._paths.lengths:  # a sequence's length is part of its path (and of its cost)
            cols.insert(0, self.lengths.to(self._device)[:, None])
        # per-token decisions whose positions set the cost (the exit of every token): -1
        # where a sample made none (an empty batch)
        for name in self._paths.token_decisions:
            v = self.tokens.get(name)
            if v is None:
                v = torch.full((self._batch, self._positions), -1, dtype=torch.long)
            cols.append(v.to(self._device))
        return torch.cat(cols, dim=1)

    @property
    def path_id(self) -> torch.Tensor:
        if self._path_id is None:
            self._path_id = self._paths.assign(self.decisions())
        return self._path_id

    @property
    def unit_counts(self) -> torch.Tensor:
        if self._unit_counts is None:
            b, dev = self._batch, self._device
            counts = torch.zeros((b, self._n_units), dtype=torch.long, device=dev)
            for u, rows, where in self._events:
                sel = _rows(b, rows, where, self._compacting, dev)
                if sel is None:  # every sample of the batch
                    counts[:, u] += 1
                elif sel.dtype == torch.bool:
                    counts[:, u] += sel.long()
                else:
                    counts[sel, u] += 1
            if self._width > 1:  # a sample ran a unit as often as its positions did
                counts = counts.view(self._samples, self._width, -1).sum(1)
            self._unit_counts = counts
        return self._unit_counts

    def unit_calls(self) -> list[tuple[int, int]]:
        """(unit index, rows) of every unit call the pass made, in order (infer mode)."""
        if self._calls is not None:
            return self._calls
        out = []
        for u, rows, where in self._events:
            sel = _rows(self._batch, rows, where, self._compacting, self._device)
            n = self._batch if sel is None else sel.numel()
            out.append((u, int(sel.sum()) if sel is not None and sel.dtype == torch.bool else n))
        return out

    def __len__(self) -> int:
        return self._samples


@dataclass(frozen=True)
class Group:
    """A column group of the trace: a construct's decisions (its `column`, constructs/api.py).

    `width`: its columns (one per node), or None for a single [B] column; `nodes`: the
    construct's runtimes, which its path text reads."""

    construct: Any  # the ConstructDef
    width: int | None
    nodes: list[Any]

    @property
    def name(self) -> str:
        return self.construct.column.name

    @property
    def empty(self) -> int:
        return self.construct.column.empty

    def describe(self, values: list[int]) -> str | None:
        return self.construct.column.describe(values, self.nodes)


@dataclass
class PathTable:
    """Distinct paths seen by a model, each with a stable id."""

    groups: list[Group]
    lengths: bool = False  # each path starts with the sequence's length
    # per-token decisions that are part of a path (trace.tokens names): a per-token exit's
    # cost depends on which positions run each layer, not only on how many
    token_decisions: tuple[str, ...] = ()
    ids: dict[tuple[int, ...], int] = field(default_factory=dict)
    rows: list[tuple[int, ...]] = field(default_factory=list)

    def assign(self, decisions: torch.Tensor) -> torch.Tensor:
        """Path ids [B] for decision rows [B, D], adding new paths as they appear."""
        if decisions.shape[0] == 0:
            return decisions.new_zeros(0)
        uniq, inverse = torch.unique(decisions.cpu(), dim=0, return_inverse=True)
        local = []
        for row in uniq.tolist():
            key = tuple(row)
            if key not in self.ids:
                self.ids[key] = len(self.rows)
                self.rows.append(key)
            local.append(self.ids[key])
        return torch.tensor(local, dtype=torch.long)[inverse].to(decisions.device)

    def describe(self, path_id: int) -> str:
        """A sentence a person reads: "exit 2", "gates run 1,3 of 4", "steps 7"."""
        row, start, parts = self.rows[path_id], 0, []
        if self.lengths:
            parts.append(f"length {row[0]}")
            start = 1
        for g in self.groups:
            n = 1 if g.width is None else g.width
            values = list(row[start : start + n])
            start += n
            text = g.describe(values) if values else None
            if text:
                parts.append(text)
        if self.token_decisions:  # e.g. "tokens by exit 0:5 2:11"
            rest = row[start:]
            n = len(rest) // len(self.token_decisions)
            for k, name in enumerate(self.token_decisions):
                v = [x for x in rest[k * n : (k + 1) * n] if x >= 0]
                counts = " ".join(f"{e}:{v.count(e)}" for e in sorted(set(v)))
                parts.append(f"tokens by {name} {counts}")
        return "; ".join(parts) or "static"

    def state(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows]}
