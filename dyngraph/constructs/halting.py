"""`halting`: a step applied until each sample halts (ACT, Learning to Stop, PonderNet).

The step sees the previous state and the input that entered the node; the state starts from
zeros or an `init` module. Rules:
- `act` (Graves): a halting unit gives h_n; a sample halts at the first N with
  sum h_n >= 1 - epsilon (or at max_steps); the output is the halting-weighted mean of the
  step outputs, the last weight being the remainder R = 1 - sum_{n<N} h_n. Ponder cost N + R.
- `l2s` (Chen et al.): a stop policy pi(x, x_t) on [input, state, one-hot step] gives a stop
  probability; a sample stops at the first step where it is >= threshold; output x_t there.
- `pondernet`: lambda_n from a unit; a sample halts at the first step where the probability of
  having halted, 1 - prod(1 - lambda_j), reaches `threshold` (0.5: the median of its halting
  distribution, deterministic so that a batch and a single sample agree); output x_n there.

Infer compacts: halted samples leave the loop. Dense and train run every step for every sample
and return every step's output (train) for the objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import AliasChoices, Field

from ..blocks.steps import FlagStep, StopFeatures
from ..core.types import InlineModule, ModuleRef, Strict
from ..runtime.context import const, pseudo_uniform
from . import halting_stream, halting_time, token_halting
from .api import Column, ConstructDef, Site, attr_sweep
from .halting_objective import halting_objective
from .registry import register_construct

_steps = Field(
    validation_alias=AliasChoices("max_steps", "steps"),
    ge=1,
    le=1000,
    description="number of steps at most (`steps` is accepted too)",
)


class _Common(Strict):
    step: ModuleRef
    max_steps: int = _steps
    shared: bool = Field(True, description="one step module for every step (false: one per step)")
    init: ModuleRef | None = None


class HaltingOptions(Strict):
    """`halting:` in a training stage."""

    l2s: Literal["likelihood", "imitation", "joint"] = Field(
        "joint", description="L2S stage I, stage II, or both"
    )


class ActSpec(_Common):
    rule: Literal["act"]
    unit: ModuleRef | None = None
    epsilon: float = Field(0.01, gt=0.0, lt=1.0)
    ponder_cost: float = Field(1e-3, ge=0.0)
    step_flag: bool = Field(False, description="append a first-step flag to the input (ACT)")
    carry: bool = Field(
        False, description="ponder at every step of a sequence, the state carried (Graves)"
    )
    per: Literal["sample", "token"] = Field(
        "sample",
        description="`token`: each position halts on its own over depth, a shared sequence "
        "step (Universal Transformer; token_halting.py)",
    )


class L2SSpec(_Common):
    rule: Literal["l2s"]
    policy: ModuleRef
    beta: float = Field(1.0, gt=0.0)
    threshold: float = Field(0.5, ge=0.0, le=1.0)


class PonderSpec(_Common):
    rule: Literal["pondernet"]
    unit: ModuleRef | None = None
    prior: float = Field(0.2, gt=0.0, lt=1.0, description="lambda_p of the geometric prior")
    kl_weight: float = Field(0.01, ge=0.0)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    carry: bool = Field(
        False, description="ponder at every step of a sequence, the halting step's state carried"
    )


HaltingSpec = Annotated[Union[ActSpec, L2SSpec, PonderSpec], Field(discriminator="rule")]  # noqa: UP007


@dataclass(eq=False)
class HaltingRuntime:
    """One halting node in each execution mode: its rule and settings, its units."""

    index: int
    rule: str  # act, l2s or pondernet
    max_steps: int
    threshold: float | None  # l2s, pondernet
    epsilon: float | None  # act
    steps: list[Any]  # the step's unit (one per step when not shared)
    unit: Any  # the halting unit (act, pondernet) or the stop policy (l2s)
    init: Any  # the initial state's unit, or None: zeros
    state_shape: tuple
    reads: list[str]
    writes: str
    flag: bool = False  # ACT's first-step flag
    ponder_cost: float = 0.0  # ACT
    prior: float = 0.0  # PonderNet
    kl_weight: float = 0.0  # PonderNet
    beta: float = 1.0  # L2S
    live_after: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"halting {self.index}"

    def _step(self, ctx, t: int, h, x, count=None):
        unit = self.steps[t if len(self.steps) > 1 else 0]
        flag = [x.new_full((x.shape[0], 1), 1.0 if t == 0 else 0.0)] if self.flag else []
        return ctx.call(unit, h, x, *flag, count=count)

    def _decide(self, ctx, t: int, h, x, carry, prev, count=None):
        """The halting quantity after step t: (halts now [rows], new carry, raw probability).
        The last step's forced halt is left to the caller."""
        if self.rule == "act":
            p = ctx.call(self.unit, h, count=count)
            new_carry = carry + p
            return new_carry >= const(1 - self.epsilon, new_carry), new_carry, p
        if self.rule == "l2s":
            onehot = x.new_zeros((x.shape[0], self.max_steps))
            if torch.is_tensor(t):  # rows each at its own step (streaming)
                onehot.scatter_(1, t.unsqueeze(1), 1.0)
            else:
                onehot[:, t] = 1.0
            q = ctx.call(self.unit, x, h, prev, onehot, count=count)
            return q >= const(self.threshold, q), carry, q
        lam = ctx.call(self.unit, h, count=count)  # pondernet: carry = prob. of not having halted
        carry = carry * (1 - lam)
        return 1 - carry >= const(self.threshold, carry), carry, lam

    def _init(self, ctx, x, h0=None):
        if h0 is not None:  # through time (halting_time.py): the previous step's state
            return h0
        if self.init:
            return ctx.call(self.init, x)
        shape = self.state_shape  # a sequence's state [L, D] has the batch's length
        shape = (x.shape[1], *shape[1:]) if x.dim() == 3 == len(shape) + 1 else shape
        return x.new_zeros((len(x), *shape))

    def _weigh(self, acc, halt, carry, p, h):
        """ACT: add step output `h` to the running mean, weighted by its halting probability
        `p`, or by the remainder 1 - carry where the sample halts now."""
        w = torch.where(halt, 1 - carry, p) if torch.is_tensor(halt) else (1 - carry if halt else p)
        return torch.addcmul(acc, w.view(-1, *([1] * (h.dim() - 1))), h)

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        ctx.env[self.writes] = self.infer(ctx, x) if ctx.compacting else self._all_steps(ctx, x)

    def infer(self, ctx, x: torch.Tensor, h0=None) -> torch.Tensor:
        """Infer: the node's output for the current rows (`h0`: the initial state)."""
        return self._infer_one(ctx, x, h0) if x.shape[0] == 1 else self._infer(ctx, x, h0)

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `infer` on the local it reads."""
        x = g.var(self.reads[0])
        g.assign(self.writes, f"{g.bind(self, f'halting{self.index}')}.infer(ctx, {x})")

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it)."""
        return {"kind": "halting", "index": self.index, "rule": self.rule,
                "max_steps": self.max_steps, "threshold": self.threshold,
                "epsilon": self.epsilon, "steps": [u.index for u in self.steps],
                "unit": self.unit.index, "init": None if self.init is None else self.init.index,
                "state_shape": list(self.state_shape), "flag": self.flag,
                "reads": list(self.reads), "writes": self.writes}  # fmt: skip

    # streaming (runtime/stream.py): entry, then one ponder step (halting_stream.py)
    stream_parts = halting_stream.parts

    def _infer_one(self, ctx, x: torch.Tensor, h0=None) -> torch.Tensor:
        """Infer, one sample: one host sync per step, no index tensors."""
        h = self._init(ctx, x, h0)
        carry = x.new_ones(1) if self.rule == "pondernet" else x.new_zeros(1)
        acc = torch.zeros_like(h) if self.rule == "act" else None
        last = self.max_steps - 1
        for t in range(self.max_steps):
            prev, h = h, self._step(ctx, t, h, x)
            halt, new_carry, p = self._decide(ctx, t, h, x, carry, prev)
            stop = t == last or bool(halt)
            if acc is not None:
                acc = self._weigh(acc, stop, carry, p, h)
            if stop:
                break
            carry = new_carry
        ctx.record("steps", self.index, t + 1)
        return acc if acc is not None else h

    def _infer(self, ctx, x: torch.Tensor, h0=None) -> torch.Tensor:
        """Infer, a batch: halted rows leave the loop (compacted), their outputs written once."""
        n = x.shape[0]
        h = self._init(ctx, x, h0)
        out = torch.empty_like(h)
        steps = torch.empty(n, dtype=torch.long, device=x.device)  # all halt by max_steps
        pos = None  # positions of the rows still in the loop, among the context's (None: all)
        carry = x.new_ones(n) if self.rule == "pondernet" else x.new_zeros(n)
        acc = torch.zeros_like(h) if self.rule == "act" else None
        xa, last = x, self.max_steps - 1
        for t in range(self.max_steps):
            prev, h = h, self._step(ctx, t, h, xa, pos)
            halt, new_carry, p = self._decide(ctx, t, h, xa, carry, prev, pos)
            if t == last:
                halt = torch.ones_like(halt)
            if acc is not None:
                acc = self._weigh(acc, halt, carry, p, h)
            res = acc if acc is not None else h
            out, pos, (h, xa, carry, acc), done = ctx.retire(
                halt, res, out, steps, t + 1, pos, [h, xa, new_carry, acc]
            )
            if done:
                break
        ctx.record("steps", self.index, steps)
        return out

    def _all_steps(self, ctx, x: torch.Tensor, h0=None) -> torch.Tensor:
        """Dense/train: every step for every row; outputs follow the infer rule exactly."""
        n = x.shape[0]
        h = self._init(ctx, x, h0)
        running = torch.ones(n, dtype=torch.bool, device=x.device)
        carry = x.new_ones(n) if self.rule == "pondernet" else x.new_zeros(n)
        out, acc, remainder = torch.zeros_like(h), torch.zeros_like(h), x.new_zeros(n)
        steps, states, probs = torch.zeros(n, dtype=torch.long, device=x.device), [], []
        view = (-1, *([1] * (h.dim() - 1)))
        for t in range(self.max_steps):
            prev, h = h, self._step(ctx, t, h, x, count=running)
            halt, new_carry, p = self._decide(ctx, t, h, x, carry, prev, count=running)
            if t == self.max_steps - 1:
                halt = torch.ones_like(halt)
            states.append(h)
            probs.append(p)
            now = running & halt
            if self.rule == "act":
                w = torch.where(now, 1 - carry, p) * running
                acc = torch.addcmul(acc, w.view(view), h)
                remainder = torch.where(now, 1 - carry, remainder)
                out = acc
            else:
                out = torch.where(now.view(view), h, out)
            steps = torch.where(now, t + 1, steps)
            carry = torch.where(running, new_carry, carry)
            running = running & ~halt
            if ctx.mode == "train" and self.rule == "act" and not bool(running.any()):
                break
        ctx.record("steps", self.index, steps)
        if ctx.mode == "train":
            ponder = steps.to(x.dtype) + remainder
            ctx.extras["halting"].append(dict(rule=self.rule, states=states, probs=probs,
                                              steps=steps, remainder=remainder, ponder=ponder))  # fmt: skip
        return out


def build_halting(spec, b, site: Site) -> tuple[HaltingRuntime, tuple] | None:
    """Check and build one halting node."""
    index = b.next_index("halting", column="steps")
    if getattr(spec, "per", "sample") == "token":
        return token_halting.build(spec, b, site, index)
    name, path, x_shape = f"halting {index}", site.path, site.in_shape
    carry = getattr(spec, "carry", False)
    if carry:  # the step reads one token of the sequence at a time
        if not halting_time.check(spec, b, site):
            return None
        x_shape = x_shape[1:]
    flag = getattr(spec, "step_flag", False)
    step_in = (*x_shape[:-1], x_shape[-1] + 1) if flag else x_shape
    if not spec.shared and not isinstance(spec.step, InlineModule):
        msg = "`shared: false` needs an inline step (a named module is one instance)"
        return b.problem(path + ("shared",), msg)
    n_mods = 1 if spec.shared else spec.max_steps
    mods = [b.module(spec.step, path + ("step",), [step_in], ("step",)) for _ in range(n_mods)]
    if any(m is None for m in mods):
        return None
    state = tuple(mods[0].state_shape)
    out = b.shapes_of(mods[0], [state, step_in], path + ("step",), "the step")
    if out is not None and out != state:
        msg = f"shape mismatch: the step returns {list(out)}, its state is {list(state)}"
        b.problem(path + ("step",), msg)
    if out != state:
        return None
    init_unit = None
    if spec.init is not None:
        im = b.module(spec.init, path + ("init",), [x_shape])
        s = None if im is None else b.shapes_of(im, [x_shape], path + ("init",), "init")
        if s is not None and s != state:
            msg = f"shape mismatch: init outputs {list(s)}, the state is {list(state)}"
            b.problem(path + ("init",), msg)
        if s != state:
            return None
        init_unit = b.unit(f"{name} init", im, [x_shape], "segment", name)
    shapes = [state, x_shape] + ([(1,)] if flag else [])
    steps = [
        b.unit(f"{name} step" + ("" if n_mods == 1 else f" {t}"), FlagStep(m) if flag else m,
               shapes, "segment", name)
        for t, m in enumerate(mods)
    ]  # fmt: skip
    if spec.rule == "l2s":
        own = getattr(mods[0], "stop_features_dim", None)
        fdim = own if own is not None else math.prod(x_shape) + math.prod(state)
        pm = b.module(spec.policy, path + ("policy",), [(fdim + spec.max_steps,)], ("stop_policy",))
        if pm is None:
            return None
        in_shapes = [x_shape, state, state, (spec.max_steps,)]
        unit = b.unit(f"{name} stop policy", StopFeatures(pm, mods[0]), in_shapes, construct=name)
    else:
        default = InlineModule(type="act_unit" if spec.rule == "act" else "lambda_unit")
        um = b.module(spec.unit or default, path + ("unit",), [state], ("halting_unit",))
        if um is None:
            return None
        unit = b.unit(f"{name} halting unit", um, [state], construct=name)
    own = {
        f: getattr(spec, f)
        for f in ("ponder_cost", "prior", "kl_weight", "beta")
        if hasattr(spec, f)
    }
    rt = HaltingRuntime(index, spec.rule, spec.max_steps, getattr(spec, "threshold", None),
                        getattr(spec, "epsilon", None), steps, unit, init_unit, state,
                        [site.in_id], site.node_id, flag, **own)  # fmt: skip
    if carry:
        return halting_time.CarryRuntime(rt, site.in_shape[0]), (site.in_shape[0], *state)
    return rt, state


# ---------------------------------------------------------------- what generic code reads


GRID = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
EPSILONS = [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]


def _sweep(model, haltings: list[HaltingRuntime]):
    """The stop threshold (L2S, PonderNet), else ACT's epsilon."""
    hs = [h for h in haltings if h.rule in ("l2s", "pondernet")]
    if hs:
        return attr_sweep("halting threshold", GRID, hs, "threshold")
    acts = [h for h in haltings if h.rule == "act"]
    return attr_sweep("ACT epsilon", EPSILONS, acts, "epsilon") if acts else None


def _longest(h: HaltingRuntime, counts: torch.Tensor, macs: torch.Tensor) -> None:
    """Every step, up to max_steps."""
    for s in h.steps:
        counts[s.index] = h.max_steps if len(h.steps) == 1 else 1
    counts[h.unit.index] = h.max_steps


def force(h: HaltingRuntime, steps: tuple[int, int] | float) -> dict:
    """Benchmarks and tests (dyngraph.forcing): each sample runs a number of steps drawn in
    [lo, hi] from its input, or (c in (0, 1)) goes on after each step with probability c
    (t: a step, or rows each at its own step in a stream)."""
    if isinstance(h, token_halting.TokenHaltingRuntime):
        return token_halting.force(h, steps)
    seen: list = [None, None]

    def draw(x: torch.Tensor) -> torch.Tensor:
        u = pseudo_uniform(x, 300 + h.index)
        if isinstance(steps, float):
            return 1 + (torch.log1p(-u) / math.log(steps)).floor().long()
        return steps[0] + (u * (steps[1] - steps[0] + 1)).long()

    def decide(ctx, t, state, x, carry, prev, count=None):
        _, new_carry, p = HaltingRuntime._decide(h, ctx, t, state, x, carry, prev, count)
        if seen[0] is not x:  # the draw once per input of the loop (it changes as rows leave)
            seen[:] = [x, draw(x)]
        return seen[1] <= (t + 1 if torch.is_tensor(t) else const(t + 1, seen[1])), new_carry, p

    return {"_decide": decide}


HALTING = register_construct(
    ConstructDef(
        key="halting",
        schema=HaltingSpec,
        build=build_halting,
        plural="haltings",
        column=Column("steps", True, 0, lambda v, _: "steps " + "+".join(map(str, v))),
        objective=halting_objective,
        options=HaltingOptions,
        legacy_options={"l2s": "l2s"},
        thresholds=lambda hs: [(h, 0.0, 1.0) for h in hs],
        settings=("haltings", ("threshold", "epsilon")),
        sweep=_sweep,
        sweep_rank=3,
        paths=lambda h, done, going: (done, going * h.max_steps),
        longest=_longest,
        force=force,
    )
)
