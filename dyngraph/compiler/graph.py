"""The graph's shape: `repeat` unrolled into nodes with ids, and the checks on their order.

Nodes run in order; each reads its `inputs` (default: the node before). Problems are reported
on the resolver, at the node that causes them.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from ..constructs import CONSTRUCTS
from ..core.errors import format_path
from ..core.types import InlineModule
from .names import node_name

#: Nodes of a graph after `repeat` is unrolled: each is a module built and checked, so the
#: bound keeps validation within seconds.
MAX_GRAPH_NODES = 1_000


def construct_key(node: Any) -> str | None:
    """The construct key of a graph node, None for a module node."""
    if isinstance(node, InlineModule | str):
        return None
    for key in CONSTRUCTS:
        if hasattr(node, key):
            return key
    return None


def _unrolled_size(nodes: list) -> int:
    """How many nodes `nodes` become once every `repeat` is unrolled."""
    return sum(n.repeat * _unrolled_size(n.nodes) if _is_repeat(n) else 1 for n in nodes)


def _is_repeat(node: Any) -> bool:
    return hasattr(node, "repeat") and hasattr(node, "nodes")


def unroll(r, nodes: list, path: tuple, reps: tuple[int, ...] = ()) -> list[tuple[str, Any, tuple]]:
    """(id, node, path) of every node, `repeat` unrolled; ids of repetitions are generated."""
    out = []
    seen = r._seen_ids
    for i, node in enumerate(nodes):
        p = path + (i,)
        if _is_repeat(node):
            size = node.repeat * _unrolled_size(node.nodes)
            if r._unrolled + size > MAX_GRAPH_NODES:
                r.problem(
                    p + ("repeat",),
                    f"`repeat: {node.repeat}` unrolls to {size:,} nodes; a graph has at most "
                    f"{MAX_GRAPH_NODES:,} nodes after unrolling",
                )
                r._unrolled = MAX_GRAPH_NODES + 1
                return out
            for k in range(node.repeat):
                out += unroll(r, node.nodes, p + ("nodes",), reps + (k,))
            continue
        nid, in_repeat = getattr(node, "id", None), bool(reps)
        if nid is not None:
            if in_repeat:
                r.problem(
                    p + ("id",),
                    "ids are not allowed inside `repeat` (each repetition would redefine it)",
                )
            elif nid == "input":
                r.problem(p + ("id",), "'input' is reserved for the model input")
            elif nid in seen:
                r.problem(p + ("id",), f"duplicate id '{nid}' (first at {format_path(seen[nid])})")
            seen[nid] = p
        if in_repeat and getattr(node, "inputs", None):
            r.problem(p + ("inputs",), "`inputs` are not allowed inside `repeat`")
        r._unrolled += 1
        # a repetition's id: @r (@r1.r2 inside nested repeats); the first one has none
        auto = f"_{format_path(p)}" + ("@" + ".".join(map(str, reps)) if any(reps) else "")
        nid = nid if (nid and not in_repeat) else auto
        r.names.node(nid, node_name(p, reps, None if in_repeat else getattr(node, "id", None)))
        out.append((nid, node, p))
    return out


def check_order(r, items: list, dag: nx.DiGraph) -> None:
    """Every input is defined before the node that reads it (a cycle is named as one)."""
    pos = {nid: k for k, (nid, *_rest) in enumerate(items)}
    pos["input"] = -1
    for nid, _node, path, inputs in items:
        for i, src in enumerate(inputs):
            if src in pos and pos[src] >= pos[nid]:
                try:
                    cyc = nx.find_cycle(dag, source=nid)
                    ring = " -> ".join([cyc[0][0], *[v for _, v in cyc]])
                    r.problem(path + ("inputs", i), f"cycle: {ring}")
                except nx.NetworkXNoCycle:
                    r.problem(
                        path + ("inputs", i),
                        f"reads '{src}', which is defined later (nodes run in order)",
                    )
