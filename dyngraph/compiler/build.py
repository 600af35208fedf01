"""The build pass: unroll the graph, resolve and build its nodes, check it, plan it.

One pass does all the semantic checks, collecting every problem rather than stopping at the
first, and — when there are none — yields the plan the runtime executes: static segments (fx
GraphModules) and construct runtimes, in graph order, with the units they run. The jobs are
in their own modules: resolve.py (references, blocks, shapes, units), graph.py (unrolling and
order), plan.py (liveness and the plan); this one walks the graph and asks each construct to
build its nodes.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

from ..blocks import BLOCKS
from ..blocks.custom import importable_beside
from ..blocks.registry import acts_per_token, sequence_model
from ..constructs import CONSTRUCTS, Site
from ..core.errors import SpecError, did_you_mean
from .fx_segments import StaticNode
from .graph import MAX_GRAPH_NODES, check_order, construct_key, unroll
from .memory import memory_problems
from .plan import Plan, live_steps
from .resolve import Resolver
from .units import IdsShape, Shape

__all__ = ["MAX_GRAPH_NODES", "Plan", "build_plan"]


def _wire(r: Resolver, flat: list) -> list[tuple[str, Any, tuple, list[str]]]:
    """Each node with its inputs; unknown inputs, cycles and unused outputs reported. A node
    whose construct passes its input on (an exit) is a sink, and the next node reads its input."""
    defined, all_ids = ["input"], {nid for nid, _, _ in flat}
    dag = nx.DiGraph()
    dag.add_node("input")
    items, prev, sinks = [], "input", set()
    for nid, node, path in flat:
        explicit = getattr(node, "inputs", None)
        inputs = list(explicit) if explicit is not None else [prev]
        dag.add_node(nid)
        for i, src in enumerate(inputs):
            if src not in all_ids and src != "input":
                r.problem(
                    path + ("inputs", i), f"unknown input '{src}'{did_you_mean(src, defined)}"
                )
            else:
                dag.add_edge(src, nid)
        items.append((nid, node, path, inputs))
        key = construct_key(node)
        passes = key is not None and CONSTRUCTS[key].passes_input
        if passes:
            sinks.add(nid)
        prev = inputs[0] if passes else nid
        defined.append(nid)
    check_order(r, items, dag)
    sinks |= {flat[-1][0]} if flat else set()
    reach = set().union(*(nx.ancestors(dag, s) | {s} for s in sinks)) if sinks else set()
    for nid, _node, path, _ in items:
        if nid not in reach:
            r.problem(
                path,
                f"the output of node '{nid}' is never used: it reaches no exit and not the graph's output",
            )
    return items


def _module_node(r: Resolver, node: Any, path: tuple, inputs: list[str]):
    """A static node's module and output shape (None where it has a problem)."""
    in_shapes = [r.shapes.get(i) for i in inputs]
    if isinstance(node, str):
        r._referenced.add(node)
    m = r.module(node, path, in_shapes)
    named = isinstance(node, str) and node in r.spec.modules
    bd = BLOCKS.get(r.spec.modules[node].type if named else getattr(node, "type", ""), None)
    if bd is not None:
        lo, hi = bd.arity
        if len(inputs) < lo or (hi is not None and len(inputs) > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            r.problem(path, f"'{bd.name}' takes {want} input(s), got {len(inputs)}")
            return m, None
    if m is None:
        return None, None
    return m, r.shapes_of(m, in_shapes, path, f"'{bd.name if bd else node}'")


def build(r: Resolver) -> Plan | None:
    """The plan of `r.spec`, or None with the problems on `r`."""
    spec = r.spec
    flat = unroll(r, spec.graph, ("graph",))
    if r._unrolled > MAX_GRAPH_NODES:
        return None  # reported at the repeat that crossed the bound; nothing else is built
    shape = tuple(spec.input.shape)
    shapes: dict[str, Shape | None] = {
        "input": IdsShape(shape) if spec.input.dtype == "int64" else shape
    }
    r.shapes = shapes
    items = _wire(r, flat)
    steps: list[Any] = []
    pending: list[StaticNode] = []
    pending_reads: list[str] = []
    aliases: dict[str, str] = {}

    def flush() -> None:
        if pending:
            steps.append(("segment", list(pending), list(pending_reads)))
            pending.clear()
            pending_reads.clear()

    token_rows = False  # after a per-token exit: each layer is its own step (token_rows.py)
    for nid, node, path, inputs in items:
        r.names.enter(nid, path)
        inputs = [aliases.get(i, i) for i in inputs]
        key = construct_key(node)
        r.graph_end = (key, path)
        if key is None:  # a static module node
            m, shapes[nid] = _module_node(r, node, path, inputs)
            if m is not None and token_rows:
                if _rows_layer(r, m, path, inputs, shapes[nid]):
                    steps.append(("rows", [StaticNode(nid, m, inputs, path, r.names.label(nid))],
                                  list(inputs)))  # fmt: skip
            elif m is not None:
                inside = {n.node_id for n in pending}
                pending_reads.extend(
                    i for i in inputs if i not in pending_reads and i not in inside
                )
                pending.append(StaticNode(nid, m, inputs, path, r.names.label(nid)))
            continue
        flush()
        shapes[nid] = None
        if len(inputs) != 1:
            r.problem(path + ("inputs",), f"a {key} node takes 1 input, got {len(inputs)}")
            continue
        c = CONSTRUCTS[key]
        in_shape = shapes.get(inputs[0])
        if in_shape is None:
            continue
        r._cur_step = len(steps)
        built = c.build(getattr(node, key), r, Site(path + (key,), nid, inputs[0], in_shape))
        if built is None:
            continue
        runtime, out_shape = built
        if token_rows and not getattr(runtime, "freezes_tokens", False):
            r.problem(
                path,
                f"this {key} node cannot follow a per-token exit: only layers and per-token "
                "exits do (they update the running tokens only)",
            )
            continue
        token_rows = token_rows or getattr(runtime, "freezes_tokens", False)
        r.runtimes.setdefault(key, []).append(runtime)
        r._paths[id(runtime)] = path
        if c.passes_input:
            aliases[nid] = inputs[0]
        shapes[nid] = in_shape if c.passes_input else out_shape
        steps.append(("construct", runtime, path))
    flush()

    for name in spec.controllers:
        if name not in r._referenced:
            r.problem(("controllers", name), f"controller '{name}' is never used", key=True)
    for name in spec.modules:
        if name not in r._referenced:
            r.problem(("modules", name), f"module '{name}' is never used", key=True)
    out_shape = out_column = None  # a construct whose nodes write the output (exits)
    for key, c in CONSTRUCTS.items():
        if c.finish is not None and r.runtimes.get(key):
            shape = c.finish(r.runtimes[key], r)
            if shape is not None:
                out_shape, out_column = shape, c.column.name
    for ctl in r.controllers.values():
        if hasattr(ctl, "finalize"):
            ctl.finalize()
    last_id = aliases.get(flat[-1][0], flat[-1][0])
    if out_shape is None:
        _check_task(r, shapes.get(last_id), flat[-1][2])
    _check_data(r)
    if r.problems:
        return None
    return Plan(
        spec=spec,
        steps=live_steps(r, steps, last_id, shapes),
        units=r.units,
        output_id=last_id,
        out_shape=out_shape if out_shape is not None else shapes[last_id],
        writes_output=out_shape is not None,
        out_column=out_column,
        trace_sizes=dict(r.trace_sizes),
        blocks=r.blocks,
        legacy_names=dict(r.names.legacy),
        controllers=r.controllers,
        runtimes=r.runtimes,
        constructs=list(CONSTRUCTS.values()),
    )


def _rows_layer(r: Resolver, m, path: tuple, inputs: list[str], out: Shape | None) -> bool:
    """Whether static node `m` can run after a per-token exit (runtime/token_rows.py): one
    sequence input, its shape kept (a frozen token keeps its state), and either computing
    each token alone or taking partial queries (`forward_rows`)."""
    if out is None:
        return False
    if len(inputs) != 1 or r.shapes.get(inputs[0]) != out or len(out) != 2:
        r.problem(
            path,
            "after a per-token exit a layer takes one sequence and keeps its shape (a frozen "
            f"token keeps its state): in {[list(r.shapes.get(i) or ()) for i in inputs]}, out "
            f"{list(out)}",
        )
        return False
    if not (acts_per_token(m) or hasattr(m, "forward_rows")):
        r.problem(
            path,
            f"'{type(m).__name__}' cannot run after a per-token exit: it mixes tokens and has "
            "no partial queries (forward_rows: attention, transformer_block)",
        )
        return False
    return True


def _check_task(r: Resolver, shape: Shape | None, path: tuple) -> None:
    task = r.spec.task
    if not task.classifies or shape is None:
        return
    want = (task.classes,) if task.per == "sample" else (r.spec.input.shape[0], task.classes)
    if shape != want:
        what = "(classes)" if task.per == "sample" else "(a label per position)"
        r.problem(
            path, f"the graph's output has shape {list(shape)}; the task needs {list(want)} {what}"
        )


def _check_data(r: Resolver) -> None:
    from ..data.check import data_problems

    if r.spec.train is not None:
        for path, message, key in data_problems(r.spec.train.data):
            r.problem(("train", "data", *path), message, key=key)


def build_plan(
    spec: Any, raw: Any, file: str, trust_imports: bool = False, meta: bool = False
) -> Plan:
    """Check and build a validated spec; raise SpecError listing every problem.

    Args:
        meta: build every block on the meta device (shapes without storage: validation) and
            check that the real model would fit in memory.
    """
    r = Resolver(spec, raw, file, trust_imports)
    with (
        importable_beside(file),
        torch.device("meta" if meta else "cpu"),
        sequence_model(spec.input.is_sequence),
    ):
        plan = build(r)
    if plan is not None and meta:
        r.problems += memory_problems(r, file)
    if plan is None or r.problems:
        raise SpecError(r.problems)
    return plan
