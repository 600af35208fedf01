"""The state of one forward pass, and the helpers every construct's runtime uses.

In **infer** mode the context holds only the *active* rows of the batch: `idx` maps them to
their sample index, and `keep()` compacts every live value when samples leave (an exit). A
construct that runs a unit on part of its rows slices its inputs itself and says which rows
ran (`count=`), so that the trace knows exactly which units each sample executed.

In **dense** and **train** modes no row ever leaves: every unit runs on the whole batch, and
`live` marks the rows that infer mode would still hold (used for the trace and the counts).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

MODES = ("infer", "dense", "train")


def split(mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Positions where `mask` is true and where it is false, with one host sync.

    `None` stands for "every row" (no index tensor is built when the split is all-or-nothing):
    `yes` is None when k == n, `no` is None when k == 0.
    """
    n = mask.shape[0]
    k = int(mask.sum())
    if k == n:
        return None, _empty(mask.device), k
    if k == 0:
        return _empty(mask.device), None, k
    yes = torch.nonzero_static(mask, size=k).squeeze(1)
    no = torch.nonzero_static(~mask, size=n - k).squeeze(1)
    return yes, no, k


_EMPTY: dict[torch.device, torch.Tensor] = {}


def _empty(device) -> torch.Tensor:
    if device not in _EMPTY:
        _EMPTY[device] = torch.empty(0, dtype=torch.long, device=device)
    return _EMPTY[device]


def pseudo_uniform(x: torch.Tensor, salt: int) -> torch.Tensor:
    """A number in [0, 1) per row, fixed by the row's first value (so a sample gets the same one
    in any batch). Used to force decisions in benchmarks (`force` on a construct runtime)."""
    return torch.frac(x.detach().flatten(1)[:, 0].abs() * (9973.0 + 101.0 * salt))


class RunContext:
    """Everything one forward pass reads and writes."""

    def __init__(self, x: torch.Tensor, mode: str, trace_sizes: dict[str, int]):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        b, dev = x.shape[0], x.device
        self.mode, self.batch, self.device = mode, b, dev
        self.compacting = mode == "infer"
        self.idx: torch.Tensor | None = (
            None  # infer: sample index of each current row; None = all, in order
        )
        self.live = None if self.compacting else torch.ones(b, dtype=torch.bool, device=dev)
        self.env: dict[str, torch.Tensor] = {"input": x}
        self.states: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None
        self.events: list[tuple[int, torch.Tensor | None]] = []
        self.extras: dict[str, Any] = defaultdict(list)
        self.gamma_overrides: dict[str, dict[str, float]] = {}
        self._rows = b
        self.trace = {
            "exit": torch.full((b,), -1, dtype=torch.long, device=dev),
            "gates": torch.full((b, trace_sizes["gates"]), -1, dtype=torch.long, device=dev),
            "choices": torch.full((b, trace_sizes["choices"]), -1, dtype=torch.long, device=dev),
            "steps": torch.zeros((b, trace_sizes["steps"]), dtype=torch.long, device=dev),
        }

    @property
    def rows(self) -> int:
        """The number of rows the values in `env` have now."""
        return self._rows

    @property
    def done(self) -> bool:
        return self._rows == 0

    def sample_index(self) -> torch.Tensor:
        """Infer: the sample index of every current row."""
        if self.idx is None:
            self.idx = torch.arange(self.batch, device=self.device)
        return self.idx

    def _global(self, count: torch.Tensor | None) -> torch.Tensor | None:
        """Which samples `count` (positions or a mask over the current rows) stands for
        (None: every current row, in infer mode)."""
        if self.compacting:
            if count is None:
                return self.idx
            return (
                count
                if self.idx is None and count.dtype != torch.bool
                else self.sample_index()[count]
            )
        if count is None:
            return self.live
        if count.dtype == torch.bool:
            return self.live & count
        mask = torch.zeros_like(self.live)
        mask[count] = True
        return self.live & mask

    def call(self, unit, *args: torch.Tensor, count: torch.Tensor | None = None):
        """Run `unit` and record which samples executed it (all current rows by default)."""
        self.events.append((unit.index, self._global(count)))
        return unit(*args)

    def record(
        self, field: str, col: int | None, values: torch.Tensor, where: torch.Tensor | None = None
    ) -> None:
        """Write decisions `values` (one per current row, or per `where` positions) to the trace."""
        t = self.trace[field]
        if self.compacting:
            if where is None and self.idx is None:
                if col is None:
                    t.copy_(values)
                else:
                    t[:, col] = values
                return
            rows = self.sample_index() if where is None else self.sample_index()[where]
            if col is None:
                t[rows] = values
            else:
                t[rows, col] = values
        else:
            sel = self.live if where is None else self._global(where)
            if col is None:
                t.copy_(torch.where(sel, values, t))
            else:
                t[:, col] = torch.where(sel, values, t[:, col])

    def leave(self, going: torch.Tensor | None, logits: torch.Tensor, exit_index: int) -> None:
        """Infer: the rows at positions `going` (None: every current row) leave with `logits`
        through exit `exit_index`."""
        t = self.trace["exit"]
        if going is None and self.idx is None:  # everyone, in order
            t.fill_(exit_index)
            if self.out is None:
                self.out = logits
                return
            self.out.copy_(logits)
            return
        rows = self.sample_index() if going is None else self.sample_index()[going]
        t.index_fill_(0, rows, exit_index)
        if self.out is None:
            self.out = logits.new_zeros((self.batch, *logits.shape[1:]))
        self.out.index_copy_(0, rows, logits if going is None else logits.index_select(0, going))

    def emit(self, leaving: torch.Tensor, logits: torch.Tensor) -> None:
        """Dense/train: the live samples in the mask `leaving` output `logits` (infer: `leave`)."""
        if self.out is None:
            self.out = logits.new_zeros((self.batch, *logits.shape[1:]))
        sel = (self.live & leaving).view(-1, *([1] * (logits.dim() - 1)))
        self.out = torch.where(sel, logits, self.out)

    def keep(self, rows: torch.Tensor, live_ids: set[str]) -> None:
        """Infer: only the rows at positions `rows` go on; compact every live value to them."""
        self.idx = rows if self.idx is None else self.idx[rows]
        self._rows = rows.shape[0]
        self.env = {k: v.index_select(0, rows) for k, v in self.env.items() if k in live_ids}
        self.states = {k: v.index_select(0, rows) for k, v in self.states.items()}

    def finish(self) -> None:
        """Infer: every remaining row has left."""
        self._rows = 0
