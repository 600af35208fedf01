"""Infer mode without the interpreter: one straight-line Python function per model.

The plan interpreter (`DynamicModel._run` in dense and train mode) walks the steps, keeps
every value in a dict and goes through each construct's layered methods. In infer mode that
walk was 2–6% of the pass at B = 64 and 1 (benchmarks/INTERPRETER.md): the units (1 MiB of
weights each at d = 512) evict the interpreter's objects from the caches, so each object it
touches between them costs an L2 miss. Here the steps are written out once, at compile time,
as the source of one function: values are locals, segments are direct calls, exits are
inlined, and no dict or loop is walked per pass.

A step takes part by an `emit_infer(g)` method that writes its infer code with an `Emitter`;
a step without one runs as itself (`step.run(ctx)`), with the values it may read put into
`ctx.env` before and read back after. Everything else a pass shares lives on the `RunContext`
as in the interpreter (row map, output, states, log), so both give the same outputs and traces
(tests/test_codegen.py compares them on every spec). `model.source()` shows the code.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any


class Emitter:
    """Writes the source of a model's infer function: lines, locals for values, bound objects."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.scope: dict[str, Any] = {}  # the function's globals: the objects it calls
        self._locals: dict[str, str] = {}
        self.defined: set[str] = set()  # the values that exist at the current line
        self._depth = 1

    def line(self, text: str) -> None:
        self.lines.append("    " * self._depth + text)

    @contextlib.contextmanager
    def block(self, header: str) -> Iterator[None]:
        """An indented block under `header` (`if ...:`)."""
        self.line(header)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def bind(self, obj: Any, hint: str) -> str:
        """A global name for `obj` in the generated function (one per object)."""
        for name, value in self.scope.items():
            if value is obj:
                return name
        base = re.sub(r"\W", "_", hint)
        name, n = base, 1
        while name in self.scope:
            name, n = f"{base}_{n}", n + 1
        self.scope[name] = obj
        return name

    def var(self, key: str) -> str:
        """The local holding environment value `key`."""
        name = self._locals.get(key)
        if name is None:
            name = self._locals[key] = f"v{len(self._locals)}"
            self.line(f"# {name}: {key!r}")
        return name

    def define(self, keys) -> str:
        """`v1, v2, `: the locals of `keys`, which the line being written assigns."""
        self.defined.update(keys)
        return self.values(keys)

    def assign(self, key: str, expr: str) -> None:
        """`v3 = expr`: the line that defines value `key`."""
        self.defined.add(key)
        self.line(f"{self.var(key)} = {expr}")

    def values(self, keys) -> str:
        """`v1, v2, `: the locals of `keys` (a tuple target or a list's body)."""
        return "".join(f"{self.var(k)}, " for k in keys)

    def live(self, keys) -> list[str]:
        """Those of `keys` that exist here, in a fixed order."""
        return sorted(k for k in keys if k in self.defined)

    def leave_all(self, out: str, where: int) -> None:
        """Infer code: every current row leaves with output `out`, taken at `where` (as
        `ctx.leave` records it); the pass ends."""
        self.line(f"ctx.leave({out}, {where}, True)")
        self.line("ctx.rows = 0")
        self.line("return")

    def part(self, stay: str, out: str, where: int, live_after) -> None:
        """Infer code, as `ctx.part`: the rows at positions `stay` (an expression) go on, their
        live values compacted; the others leave with output `out`, taken at `where`."""
        self.line(f"stay = {stay}")
        self.line("n = stay.shape[0]")
        with self.block("if n != ctx.rows:"):
            self.line(f"ctx.leave({out}, {where}, n == 0)")
            with self.block("if n == 0:"):
                self.line("ctx.rows = 0")
                self.line("return")
            live = self.live(live_after)
            self.line(f"{self.values(live)}= ctx.compact(stay, [{self.values(live)}])")

    def call(self, unit, args: list[str], count: str = "None") -> str:
        """An expression calling `unit` on `args`, logging the call as `ctx.call` does."""
        u = self.bind(unit, f"u{unit.index}")
        self.line(f"log(({unit.index}, ctx.idx, {count}))")
        return f"{u}({', '.join(args)})"


def _generic(g: Emitter, step) -> None:
    """A step without `emit_infer`: it runs on `ctx.env`, holding the values it may read."""
    s = g.bind(step, getattr(step, "name", type(step).__name__))
    before = g.live(set(step.live_after) | set(step.reads))
    g.line("ctx.env = {" + ", ".join(f"{k!r}: {g.var(k)}" for k in before) + "}")
    g.line(f"{s}.run(ctx)")
    writes = getattr(step, "writes", None)
    g.defined.add(writes)
    for k in g.live(step.live_after):
        g.line(f"{g.var(k)} = ctx.env[{k!r}]")
    with g.block("if not ctx.rows:"):
        g.line("return")


def generate(plan) -> tuple[Callable, str]:
    """The infer function of `plan` (it runs a RunContext in infer mode, as `_run` does) and
    its source."""
    g = Emitter()
    g.line("log = ctx.events.append")
    g.defined.add("input")
    g.line(f"{g.var('input')} = ctx.input")
    for step in plan.steps:
        emit = getattr(step, "emit_infer", None)
        if emit is None:
            _generic(g, step)
        else:
            emit(g)
    if not plan.writes_output:
        g.line(f"ctx.out = {g.var(plan.output_id)}")
    source = "def infer(ctx):\n" + "\n".join(g.lines) + "\n"
    scope = dict(g.scope)
    exec(compile(source, f"<dyngraph infer: {plan.spec.name}>", "exec"), scope)  # noqa: S102
    return scope["infer"], source
