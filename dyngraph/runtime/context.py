"""The state of one forward pass, and the helpers every construct's runtime uses.

Rows. A pass runs on rows, and a row is a (sample, position) pair: row id = sample x `width`
+ position, where `width` is the positions per sample. A sample-level pass (every construct
today) has width 1, and a row is a sample; a per-token pass over sequences of L tokens has
width L, one row per token. Compaction, leaving, gathering, recording and the trace all work
on row ids; only the trace folds them back to samples (docs/runtime.md).

In **infer** mode the context holds only the *active* rows of the batch: `idx` maps them to
their row ids, and `keep()` compacts every live value when rows leave (at an exit, say). A
construct that runs a unit on part of its rows slices its inputs itself and says which rows
ran (`count=`), so that the trace knows exactly which units each sample executed.

In **dense** and **train** modes no row ever leaves: every unit runs on the whole batch, and
`live` marks the rows that infer mode would still hold (used for the trace and the counts).

The hot path (infer) does as few tensor ops as it can: each one costs 1–5 µs of dispatch,
which at batch size 1 is as much as a small GEMM. So decisions and unit calls are only *logged*
here, with the row map current at the time; the trace's tensors are built from the log when
first read (`Trace`), and a batch that nobody inspects never pays for them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from . import kernels

MODES = ("infer", "dense", "train")


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions where `mask` is true (one op; its size is known on the host afterwards)."""
    return torch.where(mask)[0]


_CONST: dict[tuple, torch.Tensor] = {}


def const(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a cached 0-dim tensor of `like`'s dtype and device: an op with one costs
    about half what it costs with a Python number, which is wrapped into a tensor per call."""
    key = (value, like.dtype, like.device)
    t = _CONST.get(key)
    if t is None:
        if len(_CONST) > 4096:  # thresholds swept by calibration: keep the cache bounded
            _CONST.clear()
        t = _CONST[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


def draw_scale(salt: int) -> float:
    """The multiplier of `pseudo_uniform` (and of the kernels' forced rules) for `salt`."""
    return 9973.0 + 101.0 * salt


def pseudo_uniform(x: torch.Tensor, salt: int) -> torch.Tensor:
    """A number in [0, 1) per row, fixed by the row's first value (so a sample gets the same one
    in any batch). Used to force decisions in benchmarks (`force` on a construct runtime)."""
    v = (x if x.dim() == 2 else x.flatten(1)).select(1, 0)
    v = v.detach() if v.requires_grad else v
    return v.abs().mul_(const(draw_scale(salt), v)).frac_()


class RunContext:
    """Everything one forward pass reads and writes."""

    def __init__(
        self,
        x: torch.Tensor,
        mode: str,
        trace_sizes: dict[str, int],
        width: int = 1,
        out_column: str | None = None,
    ):
        self.check_mode(mode)
        b = x.shape[0]  # rows: samples x width
        if b % width:
            raise ValueError(f"{b} rows are not whole samples of {width} positions")
        self.mode, self.batch, self.device = mode, b, x.device
        self.width, self.samples = width, b // width
        # the trace column that says where each row took its output (an exit's index)
        self.out_column = out_column
        self.compacting = mode == "infer"
        # the fused decision kernels (infer on a CPU: no autograd), or None: ATen ops
        self.kernels = kernels.for_device(self.device) if self.compacting else None
        # infer: the row id of each current row (None: every row, in order); dense/train:
        # None, and `live` masks the rows infer mode would still hold.
        self.idx: torch.Tensor | None = None
        self.live = None if self.compacting else torch.ones(b, dtype=torch.bool, device=x.device)
        self.env: dict[str, torch.Tensor] = {"input": x}
        self.input = x  # the caller's tensor: never written to
        self.states: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None
        # (unit index, rows, where) and (field, column, rows, where, values), resolved by Trace:
        # rows = `idx` (infer) or `live` (dense/train) at the time; where = positions or a mask
        # over the current rows, or None for all of them.
        self.events: list[tuple] = []
        self.decisions: list[tuple] = []
        # (unit index, name, rows, [rows, L] values, kind): per-token runs (`record_tokens`)
        self.tokens: list[tuple] = []
        self.token_rows = None  # after a per-token exit: its TokenRows (runtime/token_rows.py)
        self.query_padding: list[tuple] = []  # running tokens' attention (token_rows.py)
        self.extras: dict[str, Any] = defaultdict(list)
        self.trace_sizes = trace_sizes
        self.rows = b  # the number of rows the values in `env` have now (0: every row left)

    @staticmethod
    def check_mode(mode: str) -> None:
        """A one-line ValueError unless `mode` is one of MODES."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def sample_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The sample of each row id."""
        return rows if self.width == 1 else torch.div(rows, self.width, rounding_mode="floor")

    def position_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The position of each row id within its sample (0 for sample rows)."""
        return torch.zeros_like(rows) if self.width == 1 else torch.remainder(rows, self.width)

    def free(self, x: torch.Tensor, live: list[torch.Tensor]) -> bool:
        """Infer: whether `x` may be overwritten in place, given the values `live` that are
        still read: it shares no memory with one of them (an identity segment or a skipping
        gate passes its input on unchanged), with a state or with the caller's input."""
        if not x.is_contiguous():  # (an expanded value overlaps itself)
            return False
        ptr = x.untyped_storage().data_ptr()
        if ptr == self.input.untyped_storage().data_ptr():
            return False
        return all(v.untyped_storage().data_ptr() != ptr for v in (*live, *self.states.values()))

    def call(self, unit, *args: torch.Tensor, count: torch.Tensor | None = None):
        """Run `unit` and record which rows executed it (all current rows by default; `count`:
        positions, or in dense/train mode a mask, over the current rows)."""
        self.events.append((unit.index, self.live if self.idx is None else self.idx, count))
        return unit(*args)

    def record(
        self, field: str, col: int | None, values, where: torch.Tensor | None = None
    ) -> None:
        """Log decisions `values` (one per current row or per `where` row, or one number for
        all of them) for the trace's `field` (column `col`)."""
        rows = self.live if self.idx is None else self.idx
        self.decisions.append((field, col, rows, where, values))

    def record_tokens(
        self, unit: int | None, name: str, values: torch.Tensor, kind: str | None = None
    ) -> None:
        """Log a per-token record `name` of each current row, `values` [rows, L], of a `kind`
        that says what a sample's cost of `unit` is (Trace, per-input MACs):
        - "routed" (bool; the default for bool values): the unit ran on those tokens as a
          shorter sequence, so it costs its cost at that many tokens;
        - "steps" (counts; the default otherwise): each position ran it that many times, a
          token at a time;
        - "queries" (bool): it ran those tokens' queries, every token a key and a value
          (partial queries after a per-token exit, runtime/token_rows.py);
        - "decision" (no unit): a per-token decision (the exit each token left at), part of
          the sample's path."""
        if kind is None:
            kind = "routed" if values.dtype == torch.bool else "steps"
        rows = self.live if self.idx is None else self.idx
        self.tokens.append((unit, name, rows, values, kind))

    def leave(self, out: torch.Tensor, where: int, everyone: bool) -> None:
        """Infer: `out` is the output of every current row, taken at `where` (recorded in the
        output column: an exit's index). Rows that go on are written again where they leave
        (the last exit takes all), so no index of the leaving rows is ever built. `everyone`:
        no row stays."""
        self.record(self.out_column, None, where)
        if self.out is None and self.idx is None and everyone:
            self.out = out  # the whole batch leaves here, and nothing writes after it
            return
        if self.out is None:
            self.out = out.new_empty((self.batch, *out.shape[1:]))
        self.put(self.out, self.idx, out)

    def part(self, staying: torch.Tensor, out: torch.Tensor, where: int, live_ids: set[str]):
        """Infer: the rows at positions `staying` go on (their live values compacted); the
        others leave with output `out`, taken at `where`."""
        n = staying.shape[0]
        self.leave(out, where, everyone=n == 0)
        if n == 0:
            self.finish()
        else:
            self.keep(staying, live_ids)

    def retire(self, halt, res, out, count, value: int, pos, carried: list):
        """Infer, inside a loop over some of the rows (`pos`: their positions among the
        context's rows; None: all of them): the rows where `halt` holds leave the loop, their
        `res` written into `out` and `value` into `count`; the others go on, `carried` (per-row
        tensors, or None) compacted to them. Returns (out, pos, carried, every row has left)."""
        going = positions(halt)
        k, m = going.shape[0], halt.shape[0]
        if k == 0:
            return out, pos, carried, False
        if k == m:  # every row left in the loop leaves now
            if pos is None:
                return res, pos, carried, count.fill_(value) is not None
            self.put(out, pos, res)
            count.index_fill_(0, pos, value)
            return out, pos, carried, True
        staying = positions(~halt)
        gone = going if pos is None else pos.index_select(0, going)
        self.put(out, gone, res, going)
        count.index_fill_(0, gone, value)
        pos = staying if pos is None else pos.index_select(0, staying)
        kept = [None if c is None else c.index_select(0, staying) for c in carried]
        return out, pos, kept, False

    def dispatch(self, units: list, x: torch.Tensor, order, counts: list[int], out_shape):
        """Infer/train: each of `units` runs on its group of rows, grouped dispatch as in MoE
        routing. `order`: the row positions grouped by unit (`counts[j]` rows for unit j);
        the outputs land in row order."""
        if max(counts) == x.shape[0]:  # one unit takes every row
            return self.call(units[counts.index(x.shape[0])], x)
        # (each unit gathers its own rows: slices of one gathered batch would reach a compiled
        # unit at a storage offset, which inductor recompiles for). `out_shape` is the declared
        # one: a shorter sequence's outputs are shorter, so the first output gives the shape.
        y, start = None, 0
        for j, unit in enumerate(units):
            if counts[j]:
                rows = order[start : start + counts[j]]
                out = self.call(unit, x.index_select(0, rows), count=rows)
                if y is None:
                    y = out.new_empty((x.shape[0], *out.shape[1:]))
                self.put(y, rows, out)
                start += counts[j]
        return y

    def emit(self, leaving: torch.Tensor, logits: torch.Tensor) -> None:
        """Dense/train: the live samples in the mask `leaving` output `logits` (infer: `leave`)."""
        if self.out is None:
            self.out = logits.new_zeros((self.batch, *logits.shape[1:]))
        sel = (self.live & leaving).view(-1, *([1] * (logits.dim() - 1)))
        self.out = torch.where(sel, logits, self.out)

    def gather(self, values: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
        """Infer: the rows at positions `rows` of every value, in one kernel call on the CPU
        (one value: index_select, which copies large selections faster: 6.4 vs 7.8 us for 150
        rows of 512 floats)."""
        if self.kernels is not None and len(values) > 1:
            return self.kernels.gather_rows(values, rows)
        return [v.index_select(0, rows) for v in values]

    def put(
        self,
        dst: torch.Tensor,
        rows: torch.Tensor | None,
        src: torch.Tensor,
        src_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Infer: `dst[rows] = src[src_rows]` in place (None: every row, in order), one memcpy
        per row on the CPU (ATen's index_copy_ walks the elements: 8 vs 3 us for 35 rows of 512
        floats)."""
        k = self.kernels
        if k is not None and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
            k.copy_rows_(dst, rows, src, src_rows)
            return dst
        if src_rows is not None:
            src = src.index_select(0, src_rows)
        return dst.copy_(src) if rows is None else dst.index_copy_(0, rows, src)

    def keep(self, rows: torch.Tensor, live_ids: set[str]) -> None:
        """Infer: only the rows at positions `rows` go on; compact every live value to them."""
        names = [k for k in self.env if k in live_ids]
        self.env = dict(zip(names, self.compact(rows, [self.env[k] for k in names])))  # noqa: B905

    def compact(self, rows: torch.Tensor, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Infer: only the rows at positions `rows` go on. Returns `values` compacted to them
        (one gather with the states and the row map, which are compacted too)."""
        self.rows = rows.shape[0]
        n = len(values)
        values = values + list(self.states.values())
        kept = self.gather(values if self.idx is None else [*values, self.idx], rows)
        self.idx = rows if self.idx is None else kept[-1]
        if self.states:
            self.states = dict(zip(self.states, kept[n : len(values)]))  # noqa: B905
        return kept[:n]

    def finish(self) -> None:
        """Infer: every remaining row has left."""
        self.rows = 0
