"""The plan a DynamicModel runs, and the liveness pass that makes it.

Liveness: after each step, which values are still read (by a later step, or as the output).
Segments export only those; constructs compact only those when rows leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..runtime.steps import SegmentStep
from ..runtime.token_rows import RowsStep
from .fx_segments import segment_module
from .units import Shape, Unit


@dataclass
class Plan:
    """What a DynamicModel runs.

    Attributes:
        steps: segments and construct runtimes, in order.
        output_id: the id whose value is the output (when no node writes the output itself).
        writes_output: some construct's nodes write the model's output (exits); `out_column`
            is its trace column, where `ctx.leave` records which node each row left at.
        trace_sizes: columns of each per-node trace group.
        runtimes: each construct's runtimes, by construct key.
    """

    spec: Any
    steps: list[Any]
    units: list[Unit]
    output_id: str
    out_shape: Shape
    writes_output: bool
    out_column: str | None  # the trace column recording where rows took their output
    trace_sizes: dict[str, int]
    blocks: nn.ModuleDict
    legacy_names: dict[str, str]  # old flat block names -> dotted ones (old checkpoints)
    controllers: nn.ModuleDict
    runtimes: dict[str, list[Any]] = field(default_factory=dict)
    constructs: list[Any] = field(default_factory=list)  # every registered ConstructDef


def live_steps(r, steps: list, out_id: str, shapes: dict) -> list:
    """The plan's steps: each pending segment as a SegmentStep exporting what is read after
    it; every step's `live_after` set."""
    reads_of = [set(obj.reads) if kind == "construct" else set(extra) for kind, obj, extra in steps]
    live_after: list[set[str]] = []
    acc = {out_id}
    for reads in reversed(reads_of):
        live_after.append(set(acc))
        acc |= reads
    live_after.reverse()
    out = []
    for k, (kind, obj, extra) in enumerate(steps):
        if kind == "construct":
            obj.live_after = live_after[k]
            out.append(obj)
            continue
        nodes, reads = obj, extra
        outs = [n.node_id for n in nodes if n.node_id in live_after[k] or kind == "rows"]
        r._cur_step = k
        u = r.unit(
            f"segment {r.next_index('segment')}",
            segment_module(nodes, reads, outs),
            [shapes[i] for i in reads],
            "segment",
        )
        if kind == "segment":
            out.append(SegmentStep(u, reads, outs, live_after=live_after[k]))
            continue
        # a layer after a per-token exit (runtime/token_rows.py)
        u.rows = nodes[0].module if hasattr(nodes[0].module, "forward_rows") else None
        out.append(RowsStep(u, nodes[0].module, reads, outs, live_after=live_after[k]))
    r.units.sort(key=lambda u: u.order)  # execution order, so that unit tables read top-down
    for i, u in enumerate(r.units):
        u.index = i
    return out
