"""Resolving a spec's references into built blocks, and the problems found on the way.

The `Resolver` is the compiler's state while it builds one plan and the `BuildContext` a
construct's builder gets: named modules and controllers built at first use (each once),
inline blocks checked against their registered parameters, output shapes found on fake
tensors, units created, and every problem collected with its place in the spec.
"""

from __future__ import annotations

from typing import Any

import pydantic
from torch import nn

from ..blocks import BLOCKS, ROLES, ShapeError
from ..blocks.registry import acts_per_token
from ..constructs import CONSTRUCTS
from ..core.errors import Problem, did_you_mean, format_path
from ..core.types import InlineModule
from ..core.yaml_loader import locate
from ..spec.load import problem_text
from .fx_segments import StaticNode, segment_module
from .init import initialize
from .names import BlockNames
from .shapes import fake_shapes, structure_key
from .units import Shape, Unit


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:300]


class Resolver:
    """What the build asks of a spec, and what a construct's builder may ask (the
    `BuildContext` of constructs/api.py): references resolved and blocks built (once each),
    shapes on fake tensors, units, and problems collected instead of raised."""

    def __init__(self, spec: Any, raw: Any, file: str, trust_imports: bool = False):
        self.spec, self.raw, self.file, self.trust_imports = spec, raw, file, trust_imports
        self.problems: list[Problem] = []
        self.blocks = nn.ModuleDict()
        self.names = BlockNames(self.blocks)
        self.controllers = nn.ModuleDict()
        self.units: list[Unit] = []
        self.counters: dict[str, int] = {}
        self.trace_sizes = {c.column.name: 0 for c in CONSTRUCTS.values() if c.column.per_node}
        self.shared: dict[str, Any] = {}  # per-controller runtime state shared by its sites
        self._named: dict[str, tuple[nn.Module, list[Shape]]] = {}
        self._named_failed: set[str] = set()
        self._referenced: set[str] = set()
        self._seen_ids: dict[str, tuple] = {}
        self._cur_step = 0
        self.shapes: dict[str, Shape | None] = {}
        self.runtimes: dict[str, list[Any]] = {}
        self.block_paths: dict[int, tuple] = {}  # id(module) -> where the spec defines it
        self.labels: dict[int, str] = {}  # id(block) -> its dotted name
        self._shape_cache: dict[tuple, Any] = {}
        self._unrolled = 0
        self.graph_end: tuple[str | None, tuple] = (None, ())  # the last node: construct key, path
        self._paths: dict[int, tuple] = {}  # id(runtime) -> its node's path

    def path_of(self, runtime: Any) -> tuple:
        """The spec path of a construct node's runtime."""
        return self._paths[id(runtime)]

    # ------------------------------------------------------------------ problems
    def problem(self, path: tuple, message: str, key: bool = False) -> None:
        line, col = locate(self.raw, path, key_position=key)
        self.problems.append(Problem(self.file, line, col, format_path(path), message))

    def next_index(self, kind: str, column: str | None = None) -> int:
        """The index of the next node of `kind`; it also gets a column of trace group `column`."""
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if column is not None and column in self.trace_sizes:
            self.trace_sizes[column] += 1
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
        self.labels[id(module)] = self.names.add(module, path)
        self.block_paths[id(module)] = path
        if m.init is not None:
            try:
                initialize(module, m.init, self.labels[id(module)], self.file)
            except ValueError as e:
                self.problem(path + ("init",), str(e))
                return None
        return module

    def _pydantic_problem(self, prefix: tuple, err: dict) -> None:

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
        head: bool = False,
    ) -> Unit:
        """A unit of the plan (`head`: a decision unit that predicts the task)."""
        u = Unit(
            len(self.units),
            name,
            kind,
            module,
            [s if isinstance(s, tuple) else tuple(s) for s in in_shapes],
            construct,
            head,
            per_token=acts_per_token(module),
        )
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
            nodes.append(StaticNode(f"b{k}", m, [cur], p, self.labels.get(id(m), "")))
            cur = f"b{k}"
        gm = segment_module(nodes, ["x"], [cur], single=True)
        return self.unit(name, gm, [in_shape], "segment", construct), shape
