"""What a construct declares, and the typed interfaces it is built and run against.

A construct is one file: its schema, a builder that turns a node's spec into its runtime's
typed constructor arguments, the runtime (every execution mode), its objective with its own
stage keys, its trace column and path text, its settings, sweep, inspect text and docs. It hands
all of that to generic code as one `ConstructDef`; nothing outside its file names it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from pydantic import BaseModel
from torch import nn

Shape = tuple[int, ...]


class Unit(Protocol):
    """A static computation the plan runs (compiler/units.py)."""

    index: int
    name: str
    kind: str
    order: tuple[int, int]

    def __call__(self, *args: torch.Tensor) -> Any: ...


class RunContext(Protocol):
    """The state of one forward pass (runtime/context.py): rows, values, log."""

    mode: str
    compacting: bool
    rows: int
    batch: int
    env: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor]
    extras: dict[str, Any]
    kernels: Any
    idx: torch.Tensor | None
    live: torch.Tensor | None

    def call(self, unit: Unit, *args: torch.Tensor, count: torch.Tensor | None = None) -> Any: ...
    def record(self, column: str, col: int | None, values: Any, where: Any = None) -> None: ...
    def record_tokens(
        self, unit: int | None, name: str, values: torch.Tensor, kind: str | None = None
    ) -> None: ...
    def leave(self, out: torch.Tensor, where: int, everyone: bool) -> None: ...
    def part(self, staying: torch.Tensor, out: torch.Tensor, where: int, live_ids: set[str]): ...
    def retire(self, halt, res, out, count, value: int, pos, carried: list) -> tuple: ...
    def dispatch(self, units: list, x: torch.Tensor, order, counts: list[int], out_shape): ...
    def sample_of(self, rows: torch.Tensor) -> torch.Tensor: ...
    def position_of(self, rows: torch.Tensor) -> torch.Tensor: ...
    def emit(self, leaving: torch.Tensor, out: torch.Tensor) -> None: ...
    def keep(self, rows: torch.Tensor, live_ids: set[str]) -> None: ...
    def compact(self, rows: torch.Tensor, values: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def put(self, dst: torch.Tensor, rows: Any, src: torch.Tensor, src_rows: Any = None) -> Any: ...
    def free(self, x: torch.Tensor, live: list[torch.Tensor]) -> bool: ...
    def finish(self) -> None: ...


class Runtime(Protocol):
    """One construct node of a plan. `run` serves the three modes (`ctx.mode`); an optional
    `emit_infer(g)` writes its infer code inline (runtime/codegen.py)."""

    name: str
    reads: list[str]
    writes: str
    live_after: set[str]

    def run(self, ctx: RunContext) -> None: ...


@dataclass(frozen=True)
class Site:
    """Where a construct node stands: its spec path, id, input and the shape of its input."""

    path: tuple
    node_id: str
    in_id: str
    in_shape: Shape


class BuildContext(Protocol):
    """What a construct's builder may ask of the compiler (compiler/resolve.py)."""

    spec: Any  # the validated Spec (task, modules, ...): read it, do not hand it to a runtime
    shapes: dict[str, Shape | None]  # shapes of the ids defined so far
    shared: dict[str, Any]  # per-controller state shared by the sites that name it

    def problem(self, path: tuple, message: str, key: bool = False) -> None: ...
    def next_index(self, kind: str, column: str | None = None) -> int: ...
    def module(
        self, ref: Any, path: tuple, in_shapes: list[Shape], roles: tuple[str, ...] = ...
    ) -> nn.Module | None: ...
    def controller(
        self, ref: Any, path: tuple, in_shape: Shape, roles: tuple[str, ...]
    ) -> tuple[nn.Module, str] | None: ...
    def shapes_of(self, fn: Any, in_shapes: list[Shape], path: tuple, what: str) -> Any: ...
    def unit(
        self, name: str, module: nn.Module, in_shapes: list[Shape], kind: str = ...,
        construct: str = ...,
    ) -> Unit: ...  # fmt: skip
    def program(
        self, body: Any, path: tuple, in_shape: Shape, name: str, construct: str
    ) -> tuple[Unit | None, Shape | None]: ...


@dataclass(frozen=True)
class Column:
    """A construct's column group in the trace.

    Attributes:
        name: the Trace attribute (`trace.exit`, `trace.gates`) and the `ctx.record` field.
        per_node: one column per node ([B, N]); False: one for the whole graph ([B]).
        empty: the value of a sample that never reached the node.
        describe: path text from this group's values and the construct's nodes (None: say
            nothing).
    """

    name: str
    per_node: bool
    empty: int
    describe: Callable[[list[int], list[Any]], str | None]


class Sweep(NamedTuple):
    """One decision setting swept for the accuracy-versus-MACs curve and calibrated."""

    name: str
    grid: list[float]
    apply: Callable[[float], None]
    restore: Callable[[], None]


@dataclass(frozen=True)
class ConstructDef:
    """A registered construct: every declaration generic code reads.

    Required: `key` (the spec key), `schema`, `build(spec, b, site) -> (runtime, out_shape)`
    or None after reporting a problem, `plural` (the model attribute listing its nodes:
    `model.exits`) and `column`. Everything else is optional.

    Attributes:
        objective: `objective(lc) -> {term: loss}` in a train-mode pass (training/loss.py);
            `lc.options` holds this construct's stage options.
        options: the schema of this construct's keys in a training stage (`STAGE.KEY: {...}`).
        legacy_options: old flat keys of a stage or its `objective:` -> option names.
        passes_input: the node's output is its input (an exit): the next node reads what it
            read, and the node ends a path of the graph.
        finish: `finish(nodes, b) -> out_shape | None` after the whole graph is built: checks
            across nodes; a shape when its nodes write the model's output.
        start_stage / before_step: apply a training stage's options (`(nodes, options)`,
            `(nodes, options, step)`).
        thresholds: `thresholds(nodes) -> [(node, lo, hi)]`, what `set_threshold` sets.
        settings: `(key, attributes)`: what calibration changes, saved in checkpoints under
            `key` (one value per node, or a mapping per node for several attributes);
            `save_settings(nodes)` and `load_settings(nodes, value)` replace the attributes.
        sweep: `sweep(model, nodes) -> Sweep | None`; the lowest `sweep_rank` with one wins.
        calibrate: `calibrate(model, nodes, val) -> {name: values}` before the sweep is fitted.
        paths: `paths(node, done, going) -> (done, going)`: distinct paths, counted along the plan.
        longest: `longest(node, counts, macs)`: set `counts` [U] to the longest path's unit runs.
        describe: `describe(model, nodes, counter) -> [line]` for `dyngraph inspect`.
        docs: `docs(model_table) -> [line]`: its section of the spec reference.
        force: `force(nodes, setting)`: decide by a per-sample draw instead (benchmarks and
            tests control the fraction of rows going each way; `dyngraph.forcing`); None:
            decide by the construct's own rule again.
        methods: model methods it adds: `model.NAME(*args)` calls `methods[NAME](nodes, *args)`
            (`set_gamma`).
    """

    key: str
    schema: Any
    build: Callable
    plural: str
    column: Column
    objective: Callable | None = None
    options: type[BaseModel] | None = None
    legacy_options: Mapping[str, str] = field(default_factory=dict)
    passes_input: bool = False
    finish: Callable | None = None
    start_stage: Callable | None = None
    before_step: Callable | None = None
    thresholds: Callable | None = None
    settings: tuple[str, tuple[str, ...]] | None = None
    save_settings: Callable | None = None
    load_settings: Callable | None = None
    sweep: Callable | None = None
    sweep_rank: int = 100
    calibrate: Callable | None = None
    paths: Callable | None = None
    longest: Callable | None = None
    describe: Callable | None = None
    docs: Callable | None = None
    methods: Mapping[str, Callable] = field(default_factory=dict)
    force: Callable | None = None

    def saved_settings(self, nodes: list) -> Any:
        """What `settings` names, of every node (what a checkpoint keeps)."""
        if self.save_settings is not None:
            return self.save_settings(nodes)
        attrs = self.settings[1]
        if len(attrs) == 1:
            return [getattr(n, attrs[0]) for n in nodes]
        return [{a: getattr(n, a) for a in attrs} for n in nodes]

    def restore_settings(self, nodes: list, value: Any) -> None:
        """Set what `saved_settings` returned (to the first nodes, where it holds fewer)."""
        if self.load_settings is not None:
            self.load_settings(nodes, value)
            return
        attrs = self.settings[1]
        for n, v in zip(nodes, value, strict=False):
            for a in attrs:
                setattr(n, a, v if len(attrs) == 1 else v[a])

    def __reduce__(self) -> tuple:
        # pickled by its key (a whole model pickles; its hooks are functions and lambdas):
        # unpickling finds it in the registry, where it must be registered again
        return (_registered, (self.key,))


def _registered(key: str) -> ConstructDef:
    from .registry import CONSTRUCTS

    return CONSTRUCTS[key]


def attr_sweep(name: str, grid: list[float], nodes: list, attr: str) -> Sweep:
    """A Sweep that sets attribute `attr` of every node in `nodes` (restore: the old values)."""
    old = [getattr(n, attr) for n in nodes]

    def apply(v: float) -> None:
        for n in nodes:
            setattr(n, attr, v)

    def restore() -> None:
        for n, o in zip(nodes, old, strict=True):
            setattr(n, attr, o)

    return Sweep(name, grid, apply, restore)
