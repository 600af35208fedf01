"""DynamicModel: the compiled model, its three execution modes, its decision settings."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .codegen import generate
from .context import RunContext
from .lengths import (
    LengthCosts,
    checked_ids,
    groups,
    lengths_of,
    merge,
    sample_unit_macs,
    unit_inputs,
)
from .trace import Group, PathTable, Trace


@dataclass
class DynamicOutput:
    """What a forward pass returns.

    Attributes:
        logits: [B, ...] each sample's prediction (the exit it took, or the last node's output).
        trace: the per-sample record of decisions and executed units.
        extras: train/dense mode only: what the objectives need (every exit's logits, gate
            probabilities and actions, controller log-probs, halting probabilities and steps).
    """

    logits: torch.Tensor
    trace: Trace
    extras: dict[str, Any] = field(default_factory=dict)


class DynamicModel(nn.Module):
    """A compiled dynamic network.

    `model.eval()(x)` runs in **infer** mode (hard decisions, compacted batches),
    `model.train()(x)` in **train** mode, and `model(x, mode="dense")` in **dense** mode
    (every branch for every sample, every decision recorded).
    """

    def __init__(self, plan, backend: str):
        super().__init__()
        self.spec = plan.spec
        self.name = plan.spec.name
        self.blocks = plan.blocks
        self.controllers = plan.controllers
        self.backend = backend
        self._plan = plan
        self.units = plan.units
        # each construct's runtimes, by construct key (also `model.exits`, `model.gates`, ...:
        # the construct's `plural`)
        self._constructs = {c.key: c for c in plan.constructs}  # their ConstructDefs
        self.nodes = {c.key: plan.runtimes.get(c.key, []) for c in plan.constructs}
        self.paths = PathTable(
            [
                Group(
                    c,
                    plan.trace_sizes.get(c.column.name, 0) if c.column.per_node else None,
                    self.nodes[c.key],
                )
                for c in plan.constructs
            ],
            lengths=plan.spec.input.is_sequence,
            token_decisions=tuple(
                dict.fromkeys(
                    n.token_decision
                    for nodes in plan.runtimes.values()
                    for n in nodes
                    if getattr(n, "token_decision", None)
                )
            ),
        )
        self._in_shape = torch.Size(plan.spec.input.shape)
        inp = plan.spec.input
        # a sequence model: (pad id, vocab (None: float vectors)); else None
        self._seq = (inp.pad_id, inp.vocab) if inp.is_sequence else None
        self._length_costs: dict[str, LengthCosts] = {}
        self._costs: dict[str, list] = {}
        # infer mode runs a function generated from the plan (runtime/codegen.py); False: the
        # interpreter, as dense and train mode (tests compare the two)
        self.codegen = True
        # inputs with NaN or inf: "raise" (refuse, naming the rows) or "propagate" (run them)
        self.nonfinite = "raise"
        # a list, so that the parameter is not registered twice; its dtype and device are the
        # model's (the input contract reads them on every call)
        self._ref = list(self.parameters())[:1]
        self._infer, self._source = generate(plan)

    def __getstate__(self) -> dict:
        # the generated function calls this model's own units and runtimes: a copy (deepcopy,
        # pickle) writes its own from its copy of the plan
        state = super().__getstate__()
        state.pop("_infer", None)
        state.pop("_source", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._infer, self._source = generate(self._plan)

    # ------------------------------------------------------------------ running
    def forward(
        self, x: torch.Tensor, mode: str | None = None, lengths: Any = None
    ) -> DynamicOutput:
        """Run a batch; `mode` defaults to train when `self.training`, else infer.

        A sequence model runs each length of the batch as its own group (runtime/lengths.py):
        token ids are padded at the end with the spec's `pad_id`; float sequences take their
        `lengths` [B] here (default: all full).

        The input contract (each breach is a one-line TypeError or ValueError):
        - `x` is a tensor [B, *input.shape]; a numpy array or a (nested) list is converted with
          `torch.as_tensor`; anything else is refused.
        - Floating inputs (float16, bfloat16, float64, ...) are cast to the model's dtype;
          integer and boolean tensors are refused (a list of numbers is read as floats), except
          by a model of token ids, which takes integer ids in [0, vocab) only.
        - `x` must be on the model's device; a mismatch names both.
        - Rows holding NaN or inf are refused, naming them (`model.nonfinite = "propagate"`
          runs them anyway: their outputs are then NaN and their decisions meaningless).
        """
        mode = mode or ("train" if self.training else "infer")
        RunContext.check_mode(mode)
        x = self._checked_input(x)
        if self._seq is None:
            if lengths is not None:
                raise ValueError(f"{self.name}: lengths are for sequence inputs")
            return self._forward(x, mode, None)
        n, whole = lengths_of(x, self._seq[0], lengths, self.name)
        if x.shape[0] == 0 or whole:
            return self._forward(x, mode, n)
        parts, where = [], []
        for length, rows in groups(n):
            parts.append(self._forward(x.index_select(0, rows)[:, :length], mode, n[rows]))
            where.append(rows)
        return merged_output(parts, where, n, x.shape[1], self.spec.task.per == "token")

    def _forward(self, x: torch.Tensor, mode: str, lengths) -> DynamicOutput:
        """One pass over a batch (of sequences: of one length)."""
        ctx = RunContext(x, mode, self._plan.trace_sizes, out_column=self._plan.out_column)
        grad = torch.is_grad_enabled()
        if x.shape[0] == 0:  # an empty batch: nothing runs, the answer is empty
            dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
            ctx.out = torch.empty((0, *self._plan.out_shape), device=x.device, dtype=dtype)
        elif grad and mode != "train":
            with torch.no_grad():
                self._run(ctx)
        else:
            self._run(ctx)
        trace = Trace(ctx, len(self.units), self.paths, lengths)
        return DynamicOutput(ctx.out, trace, dict(ctx.extras))

    def _checked_input(self, x: Any) -> torch.Tensor:
        """`x` as a tensor this model can run, or a one-line error (see forward)."""
        ref = self._ref[0] if self._ref else None  # .to() and .half() keep the object
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        if not isinstance(x, torch.Tensor):
            if isinstance(x, list | tuple):
                try:
                    x = torch.as_tensor(x, dtype=dtype)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise TypeError(
                        f"{self.name}: cannot read the input list as numbers: {e}"
                    ) from None
            elif type(x).__module__ == "numpy" and hasattr(x, "__array__"):
                x = torch.as_tensor(x)
            else:
                raise TypeError(
                    f"{self.name}: expected a tensor [B, {', '.join(map(str, self._in_shape))}], "
                    f"got {type(x).__name__}"
                )
        if self._seq is not None and self._seq[1] is not None:
            device = ref.device if ref is not None else None
            return checked_ids(x, self._seq[1], self._in_shape[0], device, self.name)
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: expected a floating-point input, got {x.dtype} (cast it: x.float())"
            )
        if ref is not None and x.device != ref.device:
            raise ValueError(
                f"{self.name}: the input is on {x.device} and the model on {ref.device}; "
                f"move one of them (x.to('{ref.device}') or model.to('{x.device}'))"
            )
        if x.shape[1:] != self._in_shape:
            raise ValueError(
                f"{self.name}: expected input [B, {', '.join(map(str, self._in_shape))}], got {list(x.shape)}"
            )
        if x.dtype != dtype:
            x = x.to(dtype)
        # one sum is finite when every value is (3 us at B = 256; isfinite().all() takes 30):
        # only a non-finite sum (or a finite overflow) pays for the row-by-row look
        if self.nonfinite == "raise" and x.numel() and not math.isfinite(x.sum().item()):
            bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()
        else:
            bad = []
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            raise ValueError(
                f"{self.name}: {len(bad)} input row(s) hold NaN or inf (rows {shown}); clean them, "
                "or set model.nonfinite = 'propagate' to run them anyway"
            )
        return x

    def _run(self, ctx: RunContext) -> None:
        if ctx.compacting and self.codegen:
            self._infer(ctx)
            return
        for step in self._plan.steps:
            if not ctx.rows:  # every sample has left
                break
            step.run(ctx)
        if not self._plan.writes_output:
            ctx.out = ctx.env[self._plan.output_id]

    def source(self) -> str:
        """The Python source of this model's infer function (runtime/codegen.py)."""
        return self._source

    @contextlib.contextmanager
    def eager(self):
        """Run the units' eager modules for a while (e.g. under FlopCounterMode, which a
        compiled graph cannot run under); the compiled ones come back afterwards."""
        saved = [u.fn for u in self.units]
        for u in self.units:
            u.fn = None
        try:
            yield self
        finally:
            for u, fn in zip(self.units, saved, strict=True):
                u.fn = fn

    def tail(self, node, value: torch.Tensor) -> torch.Tensor:
        """The model's output for `value` standing as the output of construct `node`, through the
        static segments after it (per-step losses of halting nodes)."""
        steps = self._plan.steps
        after = steps[steps.index(node) + 1 :]
        env = {node.writes: value}
        for step in after:
            if not hasattr(step, "unit") or not all(r in env for r in step.reads):
                raise NotImplementedError(
                    f"per-step losses of {node.name} need only static nodes after it, reading its output"
                )
            for k, v in zip(step.outputs, step.unit(*[env[r] for r in step.reads]), strict=True):
                env[k] = v
        return env[self._plan.output_id]

    def __getattr__(self, name: str) -> Any:
        # `model.exits`, `model.gates`, ...: a construct's runtimes under its `plural`
        # and the methods a construct adds (`model.set_gamma(...)`)
        for c in self.__dict__.get("_constructs", {}).values():
            if name == c.plural:
                return self.__dict__["nodes"][c.key]
            if name in c.methods:
                return functools.partial(c.methods[name], self.__dict__["nodes"][c.key])
        return super().__getattr__(name)

    # ------------------------------------------------------------------ decision settings
    def set_threshold(self, value: float | list[float], construct: str | None = None) -> None:
        """Set a construct's thresholds (exits, gates, halting) without recompiling: one value
        or one per node. `construct`: its key; by default the first construct (in the trace's
        order) that has thresholds and nodes in this model (the exits, where it has some)."""
        takes = [k for k, c in self._constructs.items() if c.thresholds is not None]
        if construct is None:
            construct = next((k for k in takes if self.nodes[k]), takes[0] if takes else "")
        if construct not in takes:
            raise ValueError(f"unknown construct {construct!r}; expected one of {', '.join(takes)}")
        nodes = self._constructs[construct].thresholds(self.nodes[construct])
        values = value if isinstance(value, list | tuple) else [value] * len(nodes)
        if len(values) != len(nodes):
            raise ValueError(f"{len(values)} thresholds for {len(nodes)} {construct} nodes")
        checked = [
            checked_setting(v, lo, hi, f"{node.name} threshold")
            for (node, lo, hi), v in zip(nodes, values, strict=True)
        ]
        for (node, _, _), v in zip(nodes, checked, strict=True):
            node.threshold = v

    def decision_settings(self) -> dict:
        """Thresholds, temperatures and gamma: what calibration changes (saved in checkpoints)."""
        return {
            c.settings[0]: c.saved_settings(self.nodes[k])
            for k, c in self._constructs.items()
            if c.settings is not None
        }

    def load_decision_settings(self, s: dict) -> None:
        for k, c in self._constructs.items():
            if c.settings is not None and c.settings[0] in s:
                c.restore_settings(self.nodes[k], s[c.settings[0]])

    def describe_path(self, path_id: int) -> str:
        return self.paths.describe(path_id)

    def unit_costs(self, counter: str = "fvcore") -> list:
        """Static cost (MACs, by-module breakdown, uncounted ops) of every unit, for one sample
        (a sequence model: one of the longest length)."""
        if counter not in self._costs:
            from ..cost import count_unit

            inputs = self.unit_inputs(self._in_shape[0]) if self._seq is not None else {}
            self._costs[counter] = [count_unit(u, counter, inputs.get(u.index)) for u in self.units]
        return self._costs[counter]

    def unit_macs(self, counter: str = "fvcore", length: int | None = None) -> torch.Tensor:
        """[U] static MACs of every unit at batch 1 (fvcore, or `torch` = FlopCounterMode / 2);
        a sequence model: for a sequence of `length` (default the longest)."""
        if length is None or self._seq is None or length == self._in_shape[0]:
            return torch.tensor([c.macs for c in self.unit_costs(counter)], dtype=torch.long)
        if counter not in self._length_costs:
            from ..cost import count_unit

            def count(inputs: dict) -> list[int]:
                return [count_unit(u, counter, inputs.get(u.index)).macs for u in self.units]

            self._length_costs[counter] = LengthCosts(
                self.unit_inputs, count, len(self.units), self._in_shape[0]
            )
        return torch.tensor(self._length_costs[counter].macs(length), dtype=torch.long)

    def per_input_macs(self, trace: Trace, counter: str = "fvcore") -> torch.Tensor:
        """[B] MACs each sample executed, read off its trace (a sequence: at its length)."""
        return self.sample_unit_macs(trace, counter).sum(1)

    def sample_unit_macs(self, trace: Trace, counter: str = "fvcore") -> torch.Tensor:
        """[B, U] MACs each sample executed in each unit (runtime/lengths.py)."""
        return sample_unit_macs(self, trace, counter)

    def unit_inputs(self, length: int) -> dict[int, tuple]:
        """Each unit's inputs in a dense pass of one sequence of `length` (its cost's inputs)."""
        return unit_inputs(self, length)

    def max_path_counts(self, decisions: bool = True) -> torch.Tensor:
        """[U] unit runs of the longest path: every unit once, except where a construct says
        otherwise (the costliest choice of each metalayer, halting at max_steps, ...);
        optionally without the decision units (the static backbone)."""
        counts = torch.ones(len(self.units), dtype=torch.long)
        macs = self.unit_macs()
        for k, c in self._constructs.items():
            if c.longest is not None:
                for node in self.nodes[k]:
                    c.longest(node, counts, macs)
        if not decisions:
            for u in self.units:
                if u.kind == "decision":
                    counts[u.index] = 0
        return counts

    def static_macs(self, counter: str = "fvcore", decisions: bool = True) -> int:
        """MACs of one sample on the longest path (see max_path_counts)."""
        return int(self.max_path_counts(decisions) @ self.unit_macs(counter))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, units={len(self.units)}, backend={self.backend!r}"


def merged_output(
    parts: list[DynamicOutput], where: list[torch.Tensor], lengths, full: int, per_token: bool
) -> DynamicOutput:
    """One output from those of a batch's length groups: `where[i]` the rows of group i in
    the batch, `lengths` [B] every row's length, `full` the batch's length."""
    order = torch.argsort(torch.cat(where))
    logits = merge([p.logits for p in parts], order, full)
    if per_token and logits.shape[1] < full:  # one short length
        logits = torch.nn.functional.pad(logits, (0, 0, 0, full - logits.shape[1]))
    return DynamicOutput(
        logits,
        Trace.merged([p.trace for p in parts], order, lengths, full),
        merge([p.extras for p in parts], order, full),
    )


def checked_setting(value: Any, lo: float, hi: float, what: str) -> float:
    """A decision setting as a float in [lo, hi], or a one-line ValueError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{what}: {value!r} is out of range; expected a number in [{lo}, {hi}]")
    return v
