"""Static segments as torch.fx GraphModules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx, nn


@dataclass
class StaticNode:
    """One module node of the graph: `out_id = module(*inputs)`."""

    node_id: str
    module: nn.Module
    inputs: list[str]
    path: tuple
    label: str = ""  # what a person reads (its parameters' prefix, `graph.1.rep3`)


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def segment_module(
    nodes: list[StaticNode], in_ids: list[str], out_ids: list[str], single: bool = False
) -> fx.GraphModule:
    """One GraphModule running `nodes` in order from `in_ids`, returning `out_ids`.

    Args:
        nodes: the static nodes, in order.
        in_ids: the values read from outside the segment, one placeholder each.
        out_ids: the values the rest of the model reads.
        single: return the one output as a tensor rather than a tuple.
    """
    root, graph, vals = nn.Module(), fx.Graph(), {}
    for i in in_ids:
        vals[i] = graph.placeholder(_safe(i))
    for k, n in enumerate(nodes):
        name = f"n{k}_{_safe(n.node_id)}"
        root.add_module(name, n.module)
        vals[n.node_id] = graph.call_module(name, tuple(vals[i] for i in n.inputs))
    if single:
        graph.output(vals[out_ids[0]])
    else:
        graph.output(tuple(vals[o] for o in out_ids))
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name="Segment")
    # readable names of the submodules, for per-module cost tables (not part of the graph)
    gm.labels = {f"n{k}_{_safe(n.node_id)}": n.label or n.node_id for k, n in enumerate(nodes)}
    return gm
