"""The per-sample record of a forward pass, and the table of distinct paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
    """What each sample of a batch did. Built from the forward pass's log when first read.

    Attributes:
        exit: [B] index of the exit taken (-1 when the graph has no exit).
        gates: [B, G] 1 ran the body, 0 skipped it, -1 never reached (left earlier).
        choices: [B, M] index of the choice taken at each metalayer (-1 never reached).
        steps: [B, H] steps run at each halting node (0 never reached).
        path_id: [B] the id of the sample's path (a tuple of all its decisions) in the model's
            PathTable; a path's cost is static.
        unit_counts: [B, U] how many times each sample executed each unit of the model.
    """

    def __init__(self, ctx, n_units: int, paths: PathTable):
        self._batch, self._device, self._compacting = ctx.batch, ctx.device, ctx.compacting
        self._sizes, self._decisions, self._events = ctx.trace_sizes, ctx.decisions, ctx.events
        self._n_units, self._paths = n_units, paths
        self._fields: dict[str, torch.Tensor] | None = None
        self._path_id: torch.Tensor | None = None
        self._unit_counts: torch.Tensor | None = None

    def _build(self) -> dict[str, torch.Tensor]:
        b, dev, s = self._batch, self._device, self._sizes
        t = {
            "exit": torch.full((b,), -1, dtype=torch.long, device=dev),
            "gates": torch.full((b, s["gates"]), -1, dtype=torch.long, device=dev),
            "choices": torch.full((b, s["choices"]), -1, dtype=torch.long, device=dev),
            "steps": torch.zeros((b, s["steps"]), dtype=torch.long, device=dev),
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

    def _field(self, name: str) -> torch.Tensor:
        if self._fields is None:
            self._fields = self._build()
        return self._fields[name]

    @property
    def exit(self) -> torch.Tensor:
        return self._field("exit")

    @property
    def gates(self) -> torch.Tensor:
        return self._field("gates")

    @property
    def choices(self) -> torch.Tensor:
        return self._field("choices")

    @property
    def steps(self) -> torch.Tensor:
        return self._field("steps")

    def decisions(self) -> torch.Tensor:
        """[B, D]: every decision of each sample in one row (what defines its path)."""
        return torch.cat([self.exit[:, None], self.gates, self.choices, self.steps], dim=1)

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
            self._unit_counts = counts
        return self._unit_counts

    def unit_calls(self) -> list[tuple[int, int]]:
        """(unit index, rows) of every unit call the pass made, in order (infer mode)."""
        out = []
        for u, rows, where in self._events:
            sel = _rows(self._batch, rows, where, self._compacting, self._device)
            n = self._batch if sel is None else sel.numel()
            out.append((u, int(sel.sum()) if sel is not None and sel.dtype == torch.bool else n))
        return out

    def __len__(self) -> int:
        return self._batch


@dataclass
class PathTable:
    """Distinct paths seen by a model, each with a stable id."""

    n_gates: int
    n_choices: int
    n_steps: int
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

    def describe(self, path_id: int, choice_names: list[list[str]] | None = None) -> str:
        """A sentence a person reads: "exit 2", "blocks 1,3 run", "choices small→large", "7 steps"."""
        row = self.rows[path_id]
        ex, rest = row[0], row[1:]
        gates = rest[: self.n_gates]
        choices = rest[self.n_gates : self.n_gates + self.n_choices]
        steps = rest[self.n_gates + self.n_choices :]
        parts: list[str] = []
        if ex >= 0:
            parts.append(f"exit {ex}")
        if gates:
            ran = [str(i) for i, g in enumerate(gates) if g == 1]
            reached = sum(1 for g in gates if g >= 0)
            parts.append(f"gates run {','.join(ran) or 'none'} of {reached}")
        if choices:
            names = [
                (choice_names[i][c] if choice_names and c >= 0 else str(c)) if c >= 0 else "-"
                for i, c in enumerate(choices)
            ]
            parts.append("choices " + "→".join(names))
        if steps:
            parts.append("steps " + "+".join(str(s) for s in steps))
        return "; ".join(parts) or "static"

    def state(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows]}
