"""The build pass: resolve references, build blocks, infer shapes, check the graph, plan.

One pass does all the semantic checks, collecting every problem rather than stopping at the
first, and — when there are none — yields the plan the runtime executes: static segments (fx
GraphModules) and construct runtimes, in graph order, with the units they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import pydantic
import torch
from torch import nn

from ..blocks import BLOCKS, ROLES, ShapeError
from ..blocks.custom import importable_beside
from ..constructs import CONSTRUCTS
from ..spec.errors import Problem, SpecError, did_you_mean, format_path
from ..spec.schema import RepeatNode, Spec
from ..spec.types import InlineModule
from ..spec.yaml_loader import locate
from .fx_segments import StaticNode, segment_module
from .memory import memory_problems
from .names import BlockNames, node_name
from .shapes import fake_shapes, structure_key
from .units import Shape, Unit


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:300]


@dataclass
class SegmentStep:
    """A top-level static segment: writes its outputs into the environment."""

    unit: Unit
    reads: list[str]
    outputs: list[str]
    writes: str | None = None
    live_after: set[str] = field(default_factory=set)  # ids read after it (or the output)

    def run(self, ctx) -> None:
        env = ctx.env
        if len(self.reads) == 1 == len(self.outputs):  # the common case, with less Python
            env[self.outputs[0]] = ctx.call(self.unit, env[self.reads[0]])[0]
            return
        outs = ctx.call(self.unit, *[env[i] for i in self.reads])
        for k, v in zip(self.outputs, outs, strict=True):
            env[k] = v

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): `v3, = unit(v2)`."""
        call = g.call(self.unit, [g.var(r) for r in self.reads])
        g.line(f"{g.define(self.outputs)}= {call}")


@dataclass
class Plan:
    """What a DynamicModel runs."""

    spec: Spec
    steps: list[Any]
    units: list[Unit]
    output_id: str
    out_shape: Shape
    has_exits: bool
    trace_sizes: dict[str, int]
    blocks: nn.ModuleDict
    legacy_names: dict[str, str]  # old flat block names -> dotted ones (old checkpoints)
    controllers: nn.ModuleDict
    runtimes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Site:
    """Where a construct node stands: its path, id, input and the shape of its input."""

    path: tuple
    node_id: str
    in_id: str
    in_shape: Shape


class Builder:
    """Builds and checks a validated spec; collects problems instead of raising."""

    def __init__(self, spec: Spec, raw: Any, file: str, trust_imports: bool = False):
        self.spec, self.raw, self.file, self.trust_imports = spec, raw, file, trust_imports
        self.problems: list[Problem] = []
        self.blocks = nn.ModuleDict()
        self.names = BlockNames(self.blocks)
        self.controllers = nn.ModuleDict()
        self.units: list[Unit] = []
        self.counters: dict[str, int] = {}
        self.trace_sizes = {"gates": 0, "choices": 0, "steps": 0}
        self.shared: dict[str, Any] = {}  # per-controller runtime state shared by its sites
        self._named: dict[str, tuple[nn.Module, list[Shape]]] = {}
        self._named_failed: set[str] = set()
        self._referenced: set[str] = set()
        self._seen_ids: dict[str, tuple] = {}
        self._cur_step = 0
        self.shapes: dict[str, Shape | None] = {}
        self.runtimes: dict[str, list[Any]] = {}
        self.block_paths: dict[int, tuple] = {}  # id(module) -> where the spec defines it
        self._shape_cache: dict[tuple, Any] = {}
        self._unrolled = 0

    # ------------------------------------------------------------------ problems
    def problem(self, path: tuple, message: str, key: bool = False) -> None:
        line, col = locate(self.raw, path, key_position=key)
        self.problems.append(Problem(self.file, line, col, format_path(path), message))

    def next_index(self, kind: str, trace: str | None = None) -> int:
        """The index of the next node of `kind`; it also gets a column of trace field `trace`."""
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if trace is not None:
            self.trace_sizes[trace] += 1
        return self.counters[kind] - 1

    # ------------------------------------------------------------------ blocks
    def _check_inline(self, m: InlineModule, path: tuple, roles: tuple[str, ...]):
        """The block definition and validated params of an inline block, or None (a problem)."""
        bd = BLOCKS.get(m.type)
        if bd is None:
            self.problem(
                path + ("type",), f"unknown block type '{m.type}'{did_you_mean(m.type, BLOCKS)}"
            )
            return None
        if bd.role not in roles:
            want = " or ".join(ROLES[r].split(":")[0] for r in roles)
            self.problem(
                path + ("type",),
                f"'{m.type}' is a {bd.role} block ({ROLES[bd.role]}); here a {want} is needed",
            )
            return None
        if m.type == "custom" and not self.trust_imports:
            target = m.params.get("target", "?")
            self.problem(
                path + ("target",),
                f"imports user code '{target}': refused unless the caller trusts the spec "
                "(--trust-imports, or trust_imports=True)",
            )
            return None
        try:
            return bd, bd.params.model_validate(m.params)
        except pydantic.ValidationError as e:
            for err in e.errors():
                self._pydantic_problem(path, err)
            return None

    def _build_inline(
        self, m: InlineModule, path: tuple, in_shapes: list[Shape], roles: tuple[str, ...]
    ) -> nn.Module | None:
        checked = self._check_inline(m, path, roles)
        if checked is None or any(s is None for s in in_shapes):
            return None
        bd, params = checked
        try:
            module = bd.build(params, in_shapes)
        except ShapeError as e:
            self.problem(path, f"shape mismatch: {m.type} {e}")
            return None
        except Exception as e:  # a user block's own error
            self.problem(path, f"{m.type}: cannot build: {_short(e)}")
            return None
        self.names.add(module, path)
        self.block_paths[id(module)] = path
        return module

    def _pydantic_problem(self, prefix: tuple, err: dict) -> None:
        from ..spec.load import problem_text  # one wording for every pydantic error

        loc = prefix + tuple(err["loc"])
        msg, key = problem_text(err)
        self.problem(loc, msg, key=key)

    def module(
        self,
        ref: str | InlineModule,
        path: tuple,
        in_shapes: list[Shape],
        roles: tuple[str, ...] = ("module",),
    ) -> nn.Module | None:
        """The module a reference names (built at first use) or an inline block, built and checked."""
        if isinstance(ref, InlineModule):
            return self._build_inline(ref, path, in_shapes, roles)
        self._referenced.add(ref)
        if ref in self.spec.modules:
            if any(s is None for s in in_shapes):
                return None
            if ref in self._named_failed:
                return None
            if ref not in self._named:
                m = self._build_inline(self.spec.modules[ref], ("modules", ref), in_shapes, roles)
                if m is None:
                    self._named_failed.add(ref)
                    return None
                self._named[ref] = (m, in_shapes)
            m, shapes = self._named[ref]
            if shapes != in_shapes:
                self.problem(
                    path,
                    f"shape mismatch: module '{ref}' is shared, built for inputs "
                    f"{[list(s) for s in shapes]} and used here with {[list(s) for s in in_shapes]}",
                )
                return None
            role = BLOCKS[self.spec.modules[ref].type].role
            if role not in roles:
                self.problem(
                    path, f"'{ref}' is a {role} block; here a {' or '.join(roles)} is needed"
                )
                return None
            return m
        if ref in self.spec.controllers:
            self.problem(
                path,
                f"'{ref}' is a controller; name it as a gate's policy or a metalayer's controller",
            )
            return None
        self.problem(path, f"unknown module '{ref}'{did_you_mean(ref, self.spec.modules)}")
        return None

    def controller(
        self, ref: str | InlineModule, path: tuple, in_shape: Shape, roles: tuple[str, ...]
    ) -> tuple[nn.Module, str] | None:
        """A decision maker: a named controller (shared, built at first use) or an inline one.

        Returns the module and the key its per-sample state is kept under.
        """
        if isinstance(ref, InlineModule):
            m = self.module(ref, path, [in_shape], roles)
            return None if m is None else (m, format_path(path))
        self._referenced.add(ref)
        if ref not in self.spec.controllers:
            if (
                ref in self.spec.modules
                and BLOCKS.get(self.spec.modules[ref].type, None)
                and BLOCKS[self.spec.modules[ref].type].role in roles
            ):
                m = self.module(ref, path, [in_shape], roles)
                return None if m is None else (m, ref)
            self.problem(
                path,
                f"unknown controller '{ref}'{did_you_mean(ref, list(self.spec.controllers) + list(self.spec.modules))}",
            )
            return None
        if ref in self._named_failed:
            return None
        if ref not in self.controllers:
            m = self._build_inline(
                self.spec.controllers[ref], ("controllers", ref), [in_shape], roles
            )
            if m is None:
                self._named_failed.add(ref)
                return None
            self.names.remove(m)
            self.controllers[ref] = m
        m = self.controllers[ref]
        role = BLOCKS[self.spec.controllers[ref].type].role
        if role not in roles:
            self.problem(
                path, f"controller '{ref}' is a {role}; here a {' or '.join(roles)} is needed"
            )
            return None
        return m, ref

    def shapes_of(self, fn, in_shapes: list[Shape], path: tuple, what: str) -> Any:
        """Output shapes of `fn` on fake inputs, or None (with a problem) if it cannot run."""
        key = structure_key(fn, in_shapes)
        if key is not None and key in self._shape_cache:  # a repeated block: run it once
            return self._shape_cache[key]
        try:
            out = fake_shapes(fn, in_shapes)
            if key is not None:
                self._shape_cache[key] = out
            return out
        except Exception as e:
            shapes = ", ".join(str(list(s)) for s in in_shapes)
            self.problem(path, f"shape mismatch: {what} cannot take input {shapes}: {_short(e)}")
            return None

    # ------------------------------------------------------------------ units
    def unit(
        self,
        name: str,
        module: nn.Module,
        in_shapes: list[Shape],
        kind: str = "decision",
        construct: str = "",
    ) -> Unit:
        u = Unit(len(self.units), name, kind, module, [tuple(s) for s in in_shapes], construct)
        u.order = (self._cur_step, len(self.units))
        self.units.append(u)
        return u

    def program(
        self, body: Any, path: tuple, in_shape: Shape, name: str, construct: str
    ) -> tuple[Unit | None, Shape | None]:
        """A static body (one module, or a list of them run in order) as one segment unit."""
        items = list(body) if isinstance(body, list) else [body]
        item_paths = [path + (i,) for i in range(len(items))] if isinstance(body, list) else [path]
        nodes, shape, cur = [], in_shape, "x"
        for k, (ref, p) in enumerate(zip(items, item_paths, strict=True)):
            if isinstance(ref, InlineModule) and (ref.id or ref.inputs):
                self.problem(p, "`id` and `inputs` are not allowed inside a construct's body")
                return None, None
            m = self.module(ref, p, [shape])
            if m is None:
                return None, None
            shape = self.shapes_of(m, [shape], p, f"'{ref if isinstance(ref, str) else ref.type}'")
            if shape is None:
                return None, None
            nodes.append(StaticNode(f"b{k}", m, [cur], p))
            cur = f"b{k}"
        gm = segment_module(nodes, ["x"], [cur], single=True)
        return self.unit(name, gm, [in_shape], "segment", construct), shape

    # ------------------------------------------------------------------ graph
    def build(self) -> Plan | None:
        spec = self.spec
        flat = self._unroll(spec.graph, ("graph",))
        if self._unrolled > MAX_GRAPH_NODES:
            return None  # reported at the repeat that crossed the bound; nothing else is built
        shapes: dict[str, Shape | None] = {"input": tuple(spec.input.shape)}
        self.shapes = shapes
        defined: list[str] = ["input"]
        all_ids = {nid for nid, _, _ in flat}
        dag = nx.DiGraph()
        dag.add_node("input")
        items: list[tuple[str, Any, tuple, list[str]]] = []
        prev = "input"
        exits: list[str] = []
        for nid, node, path in flat:
            explicit = getattr(node, "inputs", None)
            inputs = list(explicit) if explicit is not None else [prev]
            dag.add_node(nid)
            for i, src in enumerate(inputs):
                if src not in all_ids and src != "input":
                    self.problem(
                        path + ("inputs", i), f"unknown input '{src}'{did_you_mean(src, defined)}"
                    )
                else:
                    dag.add_edge(src, nid)
            items.append((nid, node, path, inputs))
            if _construct_key(node) == "exit":
                exits.append(nid)
            prev = nid if _construct_key(node) != "exit" else inputs[0]
            defined.append(nid)
        self._check_order(items, dag)
        sinks = set(exits) | {flat[-1][0]} if flat else set()
        reach = set().union(*(nx.ancestors(dag, s) | {s} for s in sinks)) if sinks else set()
        for nid, _node, path, _ in items:
            if nid not in reach:
                self.problem(
                    path,
                    f"the output of node '{nid}' is never used: it reaches no exit and not the graph's output",
                )
        if exits and _construct_key(flat[-1][1]) != "exit":
            self.problem(
                flat[-1][2],
                "a graph with exits must end with an exit (the last exit takes every sample left)",
            )

        steps: list[Any] = []
        pending: list[StaticNode] = []
        pending_reads: list[str] = []
        aliases: dict[str, str] = {}
        exit_sites: list[tuple[str, int]] = []

        def flush() -> None:
            if pending:
                steps.append(("segment", list(pending), list(pending_reads)))
                pending.clear()
                pending_reads.clear()

        for nid, node, path, inputs in items:
            self.names.enter(nid, path)
            inputs = [aliases.get(i, i) for i in inputs]
            in_shapes = [shapes.get(i) for i in inputs]
            key = _construct_key(node)
            if key is None:  # a static module node
                ref = node
                if isinstance(ref, str):
                    self._referenced.add(ref)
                m = self.module(ref, path, in_shapes)
                arity_ok = True
                bd = BLOCKS.get(
                    self.spec.modules[ref].type
                    if isinstance(ref, str) and ref in self.spec.modules
                    else getattr(ref, "type", ""),
                    None,
                )
                if bd is not None:
                    lo, hi = bd.arity
                    if len(inputs) < lo or (hi is not None and len(inputs) > hi):
                        want = (
                            f"{lo}"
                            if lo == hi
                            else f"at least {lo}"
                            if hi is None
                            else f"{lo} to {hi}"
                        )
                        self.problem(path, f"'{bd.name}' takes {want} input(s), got {len(inputs)}")
                        arity_ok = False
                shape = (
                    self.shapes_of(m, in_shapes, path, f"'{bd.name if bd else ref}'")
                    if (m is not None and arity_ok)
                    else None
                )
                shapes[nid] = shape
                if m is not None:
                    inside = {n.node_id for n in pending}
                    pending_reads.extend(
                        i for i in inputs if i not in pending_reads and i not in inside
                    )
                    pending.append(StaticNode(nid, m, inputs, path))
                continue
            flush()
            if len(inputs) != 1:
                self.problem(path + ("inputs",), f"a {key} node takes 1 input, got {len(inputs)}")
                shapes[nid] = None
                continue
            c = CONSTRUCTS[key]
            in_shape = shapes.get(inputs[0])
            if in_shape is None:
                shapes[nid] = None
                continue
            site = Site(path + (key,), nid, inputs[0], in_shape)
            self._cur_step = len(steps)
            built = c.build(getattr(node, key), self, site)
            if built is None:
                shapes[nid] = None
                continue
            runtime, out_shape = built
            self.runtimes.setdefault(key, []).append(runtime)
            if key == "exit":
                aliases[nid] = inputs[0]
                shapes[nid] = in_shape
                exit_sites.append((nid, len(steps)))
            else:
                shapes[nid] = out_shape
            steps.append(("construct", runtime, path))
        flush()

        for name in self.spec.controllers:
            if name not in self._referenced:
                self.problem(("controllers", name), f"controller '{name}' is never used", key=True)
        for name in self.spec.modules:
            if name not in self._referenced:
                self.problem(("modules", name), f"module '{name}' is never used", key=True)
        if self.runtimes.get("exit"):
            self.runtimes["exit"][-1].last = True
            for _, runtime, path in steps:  # only the last exit may go without a criterion
                if runtime in self.runtimes["exit"][:-1] and runtime.kind is None:
                    self.problem(
                        path + ("exit",),
                        f"{runtime.name} has no criterion: only the graph's last exit may leave it "
                        "out (it takes every sample left); add e.g. "
                        "`criterion: {type: max_prob, threshold: 0.9}`",
                    )
        for ctl in self.controllers.values():
            if hasattr(ctl, "finalize"):
                ctl.finalize()
        self._check_task(flat, shapes, exits, aliases)
        self._check_data()
        if self.problems:
            return None
        return self._plan(steps, flat[-1][0], shapes, aliases, bool(exits))

    def _unroll(
        self, nodes: list, path: tuple, reps: tuple[int, ...] = ()
    ) -> list[tuple[str, Any, tuple]]:
        out = []
        seen = self._seen_ids
        for i, node in enumerate(nodes):
            p = path + (i,)
            if isinstance(node, RepeatNode):
                size = node.repeat * _unrolled_size(node.nodes)
                if self._unrolled + size > MAX_GRAPH_NODES:
                    self.problem(
                        p + ("repeat",),
                        f"`repeat: {node.repeat}` unrolls to {size:,} nodes; a graph has at most "
                        f"{MAX_GRAPH_NODES:,} nodes after unrolling",
                    )
                    self._unrolled = MAX_GRAPH_NODES + 1
                    return out
                for r in range(node.repeat):
                    out += self._unroll(node.nodes, p + ("nodes",), reps + (r,))
                continue
            nid, in_repeat = getattr(node, "id", None), bool(reps)
            if nid is not None:
                if in_repeat:
                    self.problem(
                        p + ("id",),
                        "ids are not allowed inside `repeat` (each repetition would redefine it)",
                    )
                elif nid == "input":
                    self.problem(p + ("id",), "'input' is reserved for the model input")
                elif nid in seen:
                    self.problem(
                        p + ("id",), f"duplicate id '{nid}' (first at {format_path(seen[nid])})"
                    )
                seen[nid] = p
            if in_repeat and getattr(node, "inputs", None):
                self.problem(p + ("inputs",), "`inputs` are not allowed inside `repeat`")
            self._unrolled += 1
            # a repetition's id: @r (@r1.r2 inside nested repeats); the first one has none
            auto = f"_{format_path(p)}" + ("@" + ".".join(map(str, reps)) if any(reps) else "")
            nid = nid if (nid and not in_repeat) else auto
            self.names.node(
                nid, node_name(p, reps, None if in_repeat else getattr(node, "id", None))
            )
            out.append((nid, node, p))
        return out

    def _check_order(self, items: list, dag: nx.DiGraph) -> None:
        pos = {nid: k for k, (nid, *_rest) in enumerate(items)}
        pos["input"] = -1
        for nid, _node, path, inputs in items:
            for i, src in enumerate(inputs):
                if src in pos and pos[src] >= pos[nid]:
                    try:
                        cyc = nx.find_cycle(dag, source=nid)
                        ring = " -> ".join([cyc[0][0], *[v for _, v in cyc]])
                        self.problem(path + ("inputs", i), f"cycle: {ring}")
                    except nx.NetworkXNoCycle:
                        self.problem(
                            path + ("inputs", i),
                            f"reads '{src}', which is defined later (nodes run in order)",
                        )

    def _check_data(self) -> None:
        from ..data.check import data_problems

        if self.spec.train is not None:
            for path, message, key in data_problems(self.spec.train.data):
                self.problem(("train", "data", *path), message, key=key)

    def _check_task(self, flat, shapes, exits, aliases) -> None:
        task = self.spec.task
        if task.type != "classification" or not flat:
            return
        if not exits:
            s = shapes.get(flat[-1][0])
            if s is not None and s != (task.classes,):
                self.problem(
                    flat[-1][2],
                    f"the graph's output has shape {list(s)}; the task needs [{task.classes}] (classes)",
                )

    def _plan(self, steps, last_id, shapes, aliases, has_exits) -> Plan:
        # liveness: which ids are read after each step
        reads_of = []
        for kind, obj, extra in steps:
            reads_of.append(set(extra) if kind == "segment" else set(obj.reads))
        out_id = aliases.get(last_id, last_id)
        live_after: list[set[str]] = []
        acc = {out_id}
        for r in reversed(reads_of):
            live_after.append(set(acc))
            acc |= r
        live_after.reverse()
        plan_steps = []
        for k, (kind, obj, *rest) in enumerate(steps):
            if kind == "segment":
                nodes, reads = obj, rest[0]
                defined = [n.node_id for n in nodes]
                outs = [d for d in defined if d in live_after[k]]
                gm = segment_module(nodes, reads, outs)
                self._cur_step = k
                u = self.unit(
                    f"segment {self.next_index('segment')}",
                    gm,
                    [shapes[i] for i in reads],
                    "segment",
                )
                plan_steps.append(SegmentStep(u, reads, outs, live_after=live_after[k]))
            else:
                obj.live_after = live_after[k]
                plan_steps.append(obj)
        self.units.sort(key=lambda u: u.order)  # execution order, so that unit tables read top-down
        for i, u in enumerate(self.units):
            u.index = i
        return Plan(
            spec=self.spec,
            steps=plan_steps,
            units=self.units,
            output_id=out_id,
            out_shape=self.runtimes["exit"][-1].head_shape if has_exits else shapes[out_id],
            has_exits=has_exits,
            trace_sizes=dict(self.trace_sizes),
            blocks=self.blocks,
            legacy_names=dict(self.names.legacy),
            controllers=self.controllers,
            runtimes=self.runtimes,
        )


#: Nodes of a graph after `repeat` is unrolled: each is a module built and checked, so the
#: bound keeps validation within seconds.
MAX_GRAPH_NODES = 1_000


def _unrolled_size(nodes: list) -> int:
    """How many nodes `nodes` become once every `repeat` is unrolled."""
    return sum(
        n.repeat * _unrolled_size(n.nodes) if isinstance(n, RepeatNode) else 1 for n in nodes
    )


def _construct_key(node: Any) -> str | None:
    for key in CONSTRUCTS:
        if hasattr(node, key) and not isinstance(node, InlineModule) and not isinstance(node, str):
            return key
    return None


def build_plan(
    spec: Spec, raw: Any, file: str, trust_imports: bool = False, meta: bool = False
) -> Plan:
    """Check and build a validated spec; raise SpecError listing every problem.

    Args:
        meta: build every block on the meta device (shapes without storage: validation) and
            check that the real model would fit in memory.
    """
    b = Builder(spec, raw, file, trust_imports)
    with importable_beside(file), torch.device("meta" if meta else "cpu"):
        plan = b.build()
    if plan is not None and meta:
        b.problems += memory_problems(b, file)
    if plan is None or b.problems:
        raise SpecError(b.problems)
    return plan
