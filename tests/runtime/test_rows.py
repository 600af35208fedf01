"""Rows are (sample, position) pairs: a pass over positions (width > 1) compacts, records and
counts per row, and its trace folds rows back to samples exactly (docs/runtime.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dyngraph.runtime.context import RunContext, positions
from dyngraph.runtime.trace import Group, PathTable, Trace

S, W, D = 3, 4, 5  # samples, positions per sample, features


class Unit:
    """A unit that doubles its input and counts its calls."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def _paths() -> PathTable:
    column = SimpleNamespace(name="depth", empty=0, describe=lambda v, _: f"depth {v}")
    return PathTable([Group(SimpleNamespace(column=column), None, [])])  # one column, as exits


def _pass(mode: str) -> tuple[RunContext, torch.Tensor]:
    """Every row runs unit 0; rows whose position is odd, or of sample 1, stop (depth 1);
    the others run unit 1 (depth 2)."""
    x = torch.arange(S * W * D, dtype=torch.float32).view(S * W, D)
    ctx = RunContext(x, mode, {}, width=W, out_column="depth")
    h = ctx.call(Unit(0), x)
    rows = torch.arange(S * W)
    stop = (ctx.position_of(rows) % 2 == 1) | (ctx.sample_of(rows) == 1)
    if ctx.compacting:
        ctx.leave(h, 1, everyone=False)  # recorded in the output column: where rows left
        (h,) = ctx.compact(positions(~stop), [h])
        ctx.leave(ctx.call(Unit(1), h), 2, everyone=True)
    else:
        ctx.record("depth", None, torch.where(stop, 1, 2))
        ctx.emit(stop, h)
        ctx.live = ctx.live & ~stop
        y = ctx.call(Unit(1), h, count=~stop)
        ctx.emit(~stop, y)
    return ctx, x


@pytest.mark.parametrize("mode", ["infer", "dense"])
def test_a_pass_over_positions_folds_rows_back_to_samples(mode):
    ctx, x = _pass(mode)
    trace = Trace(ctx, 2, _paths())
    assert len(trace) == S and ctx.samples == S and ctx.width == W
    depth = trace.depth  # [samples, width]: where each position took its output
    assert depth.shape == (S, W)
    want = torch.tensor([[2, 1, 2, 1], [1, 1, 1, 1], [2, 1, 2, 1]])
    assert torch.equal(depth, want)
    # every position ran unit 0; unit 1 as often as the sample's positions that went on
    assert torch.equal(trace.unit_counts, torch.stack([torch.full((S,), W), (want == 2).sum(1)], 1))
    # outputs land at their rows: 2x for depth 1, 4x for depth 2
    out = ctx.out.view(S, W, D)
    torch.testing.assert_close(out, x.view(S, W, D) * (2.0**want)[..., None])


def test_infer_and_dense_agree_on_every_row():
    a, b = (Trace(_pass(m)[0], 2, _paths()) for m in ("infer", "dense"))
    assert torch.equal(a.depth, b.depth) and torch.equal(a.unit_counts, b.unit_counts)
    assert torch.equal(a.decisions(), b.decisions())


def test_row_ids_are_sample_and_position():
    ctx = RunContext(torch.zeros(S * W, D), "infer", {}, width=W)
    rows = torch.tensor([0, 5, 11])
    assert ctx.sample_of(rows).tolist() == [0, 1, 2] and ctx.position_of(rows).tolist() == [0, 1, 3]
    one = RunContext(torch.zeros(S, D), "infer", {})
    assert torch.equal(one.sample_of(rows), rows) and one.position_of(rows).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="not whole samples"):
        RunContext(torch.zeros(7, D), "infer", {}, width=W)
