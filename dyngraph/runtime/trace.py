"""The per-sample record of a forward pass, and the table of distinct paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class Trace:
    """What each sample of a batch did.

    Attributes:
        exit: [B] index of the exit taken (-1 when the graph has no exit).
        gates: [B, G] 1 ran the body, 0 skipped it, -1 never reached (left earlier).
        choices: [B, M] index of the choice taken at each metalayer (-1 never reached).
        steps: [B, H] steps run at each halting node (0 never reached).
        path_id: [B] the id of the sample's path (a tuple of all its decisions) in the model's
            PathTable; a path's cost is static. Computed on first access.
        unit_counts: [B, U] how many times each sample executed each unit of the model.
            Computed on first access from the run's record of which rows ran each unit.
    """

    def __init__(self, exit, gates, choices, steps, events, n_units: int, paths: PathTable):
        self.exit, self.gates, self.choices, self.steps = exit, gates, choices, steps
        self._events, self._n_units, self._paths = events, n_units, paths
        self._path_id: torch.Tensor | None = None
        self._unit_counts: torch.Tensor | None = None

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
            b = self.exit.shape[0]
            counts = torch.zeros((b, self._n_units), dtype=torch.long, device=self.exit.device)
            for u, rows in self._events:
                if rows is None:  # every sample of the batch
                    counts[:, u] += 1
                elif rows.dtype == torch.bool:
                    counts[:, u] += rows.long()
                else:
                    counts[rows, u] += 1
            self._unit_counts = counts
        return self._unit_counts

    def __len__(self) -> int:
        return self.exit.shape[0]


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
