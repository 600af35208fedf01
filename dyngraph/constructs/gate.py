"""`gate`: skip gates (SkipNet, BlockDrop).

A policy gives each sample a probability of running the body; gated-off samples skip it (the
node outputs its input unchanged), so the body must keep the shape. Policies, by style:
- `ff` (ff_gate): one small gate per block, reading the block's input;
- `recurrent` (rnn_gate): one GRU shared by every gate that names it, state carried along;
- `oneshot` (blockdrop_policy): one network reads the model input (or `reads`) once and
  decides every gate that names it.

Infer: the body runs only on the rows whose probability >= threshold. Train, by `train:`:
`straight_through` (hard forward, sigmoid gradient; the default), `soft` (output mixes
body and identity by the probability; seen to collapse when then tested hard — a documented
negative result, not the default), `sample` (Bernoulli actions with log-probs, for
REINFORCE), `hard`.

`per: token` makes it a Mixture-of-Depths gate (token_gate.py): a `token_router` scores each
token, the top `capacity` x L (or those over `threshold`) run the body as a shorter sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.types import ModuleRef, Strict
from ..runtime import kernels
from ..runtime.context import const, draw_scale, positions, pseudo_uniform
from . import token_gate
from .api import Column, ConstructDef, Site, attr_sweep
from .gate_objective import gate_objective
from .registry import register_construct

TRAIN_MODES = ("straight_through", "soft", "sample", "hard")


class GateSpec(Strict):
    """`gate: {body: MODULE or [MODULE, ...], policy: CONTROLLER or {type: ff_gate, ...}}`."""

    body: ModuleRef | list[ModuleRef]
    policy: ModuleRef
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    train: Literal["straight_through", "soft", "sample", "hard"] = "straight_through"
    per: Literal["sample", "token"] = Field(
        "sample", description="token: Mixture-of-Depths routing of each token (token_router)"
    )
    capacity: float | None = Field(
        None, gt=0.0, le=1.0, description="per token: route the top ceil(c·L) tokens"
    )
    predictor: ModuleRef | None = Field(
        None, description="per token: a causal token_router for decoding (set_decode)"
    )


class GateOptions(Strict):
    """`gate:` in a training stage: how gates decide and what their objective weighs."""

    decisions: Literal["soft", "straight_through", "sample", "hard"] | None = Field(
        None, description="gate decision mode (default: each gate's `train:`)"
    )
    penalty: float = Field(0.0, ge=0, description="lambda x mean fraction of gated blocks run")
    reward: Literal["skipnet", "blockdrop"] = Field(
        "skipnet", description="REINFORCE reward when gates sample"
    )
    skipnet_alpha: float = Field(
        0.1, ge=0, description="skipnet reward: -CE - alpha x fraction run"
    )
    blockdrop_gamma: float = Field(5.0, ge=0, description="blockdrop reward when wrong: -gamma")
    curriculum_steps: int = Field(
        0,
        ge=0,
        description="blockdrop curriculum: one more learnable gate (from the last) every N steps; 0 = off",
    )
    policy_weight: float = Field(1.0, ge=0, description="weight of the REINFORCE term")


#: keys of earlier specs: a stage's `decisions:` and its `objective:`'s gate keys
LEGACY = {
    "decisions": "decisions",
    "gate_penalty": "penalty",
    "gate_reward": "reward",
    "skipnet_alpha": "skipnet_alpha",
    "blockdrop_gamma": "blockdrop_gamma",
    "curriculum_steps": "curriculum_steps",
    "policy_weight": "policy_weight",
}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(eq=False)
class GateRuntime:
    """One gate in each execution mode."""

    index: int
    threshold: float
    train_mode: str
    body: Any  # the body's unit
    policy: Any  # the policy's unit (a one-shot policy's: shared by its gates)
    style: str  # ff, recurrent or oneshot
    key: str  # the policy's state in the run context
    column: int  # a one-shot policy's output column for this gate
    state_shape: tuple | None
    reads: list[str]
    writes: str
    forced_on: bool = False  # training curriculum (BlockDrop): this gate always runs
    per = "sample"  # (token_gate.py: per token)
    mode_override: str | None = None  # a training stage's `decisions:`
    live_after: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"gate {self.index}"

    def _merge(self, ctx, x: torch.Tensor, run: torch.Tensor, live) -> torch.Tensor:
        """Infer: the body runs on the rows at positions `run`; the others keep `x`."""
        k = run.shape[0]
        if k == x.shape[0]:
            return ctx.call(self.body, x)
        if k == 0:
            return x
        # skipped rows keep x: write the body's rows into x (in place if nothing reads x again)
        yr = ctx.call(self.body, x.index_select(0, run), count=run)
        owned = live is not None and ctx.free(x, live)
        return ctx.put(x if owned else x.clone(), run, yr)

    def probs(self, ctx, x: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
        """The policy's probability of running the body, per row (`src`: what a one-shot
        policy reads, at its first gate)."""
        if self.style == "ff":
            return ctx.call(self.policy, x)
        if self.style == "recurrent":
            h = ctx.states.get(self.key)
            if h is None:
                h = x.new_zeros((x.shape[0], *self.state_shape))
            p, ctx.states[self.key] = ctx.call(self.policy, x, h)
            return p
        if self.column == 0:  # one-shot: the policy runs once, at its first gate
            ctx.states[self.key] = ctx.call(self.policy, src)
        return ctx.states[self.key][:, self.column]

    def running(self, ctx, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        """Infer: positions of the rows that run the body, in one fused kernel call (None where
        the kernels do not apply)."""
        k = ctx.kernels
        if k is None:
            return None
        col = 0
        if self.style == "oneshot":  # p is a column of the policy's [B, gates] output
            p, col = ctx.states[self.key], self.column
        if not kernels.applies(p):
            return None
        return k.rows_where(p, kernels.AT_LEAST, self.threshold, col)

    def on(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Which rows run the body (bool): p >= threshold."""
        return p >= const(self.threshold, p)

    def infer(self, ctx, x: torch.Tensor, src: torch.Tensor | None, live) -> torch.Tensor:
        """Infer: the node's output for the current rows. `src`: what a one-shot policy reads;
        `live`: the values read after this node (None when `x` is one of them), which its
        output must not be written into."""
        p = self.probs(ctx, x, src)
        run = self.running(ctx, x, p)
        if run is None:
            on = self.on(x, p)
            ctx.record("gates", self.index, on)
            if x.shape[0] == 1:  # one sample: one host sync, no index tensors
                return ctx.call(self.body, x) if bool(on) else x
            run = positions(on)
        else:
            ctx.record("gates", self.index, 0)
            ctx.record("gates", self.index, 1, where=run)
        return self._merge(ctx, x, run, live)

    def stream_parts(self, pool_bodies: bool) -> list | None:
        """Streaming (runtime/stream.py), with `pool_bodies`: the decision, then the body on
        full batches of the rows that take it; the rows that skip go past with `x`. Else
        None: the gate runs in place, as in a batched pass (on a CPU the pooled bodies'
        copies cost more than their fuller GEMMs gain: docs/streaming.md)."""
        return [self._stream_decide, self._stream_body] if pool_bodies else None

    def _stream_decide(self, ctx) -> dict:
        x = ctx.env[self.reads[0]]
        src = ctx.env[self.reads[1]] if self.style == "oneshot" and self.column == 0 else None
        on = self.on(x, self.probs(ctx, x, src))
        ctx.record("gates", self.index, on)
        ctx.env[self.writes] = x  # (the rows that skip, past the node)
        return {1: positions(on), None: positions(~on)}

    def _stream_body(self, ctx) -> None:
        ctx.env[self.writes] = ctx.call(self.body, ctx.env[self.reads[0]])

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it)."""
        return {"kind": "gate", "index": self.index, "style": self.style,
                "policy": self.policy.index, "body": self.body.index,
                "threshold": self.threshold, "key": self.key, "column": self.column,
                "state_shape": None if self.state_shape is None else list(self.state_shape),
                "reads": list(self.reads), "writes": self.writes}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `infer` on the locals it reads."""
        x, key = g.var(self.reads[0]), self.reads[0]
        src = g.var(self.reads[1]) if self.style == "oneshot" and self.column == 0 else "None"
        live = "None" if key in self.live_after else f"[{g.values(g.live(self.live_after))}]"
        call = f"{g.bind(self, f'gate{self.index}')}.infer(ctx, {x}, {src}, {live})"
        g.assign(self.writes, call)

    def run(self, ctx) -> None:
        env, key = ctx.env, self.reads[0]
        x = env[key]
        src = env[self.reads[1]] if self.style == "oneshot" and self.column == 0 else None
        if ctx.compacting:
            live = None if key in self.live_after else [env[k] for k in self.live_after if k in env]
            env[self.writes] = self.infer(ctx, x, src, live)
            return
        p = self.probs(ctx, x, src)
        on = self.on(x, p)
        ctx.record("gates", self.index, on)
        yb = ctx.call(self.body, x, count=on)
        if ctx.mode == "dense":
            ctx.env[self.writes] = torch.where(_bcast(on, x), yb, x)
            return
        hard = on.to(x.dtype)
        mode = self.mode_override or self.train_mode
        if self.forced_on:
            one = torch.ones_like(p)
            ctx.extras["gates"].append(
                {"prob": p, "action": one, "logp": torch.zeros_like(p), "gate": one, "forced": True}
            )
            ctx.env[self.writes] = yb
            return
        if mode == "soft":
            g, act = p, hard
        elif mode == "straight_through":
            g, act = hard + p - p.detach(), hard
        elif mode == "sample":
            act = torch.bernoulli(p.detach())
            g = act
        else:
            g, act = hard, hard
        logp = act * torch.log(p.clamp_min(1e-8)) + (1 - act) * torch.log((1 - p).clamp_min(1e-8))
        ctx.extras["gates"].append(
            {"prob": p, "action": act, "logp": logp, "gate": g, "forced": False, "mode": mode}
        )
        ctx.env[self.writes] = x + _bcast(g, x) * (yb - x)


def build_gate(spec: GateSpec, b, site: Site) -> tuple[GateRuntime, tuple] | None:
    """Check and build one gate node."""
    index = b.next_index("gate", column="gates")
    if spec.per == "token":
        return token_gate.build_token_gate(spec, b, site, index)
    for key in ("capacity", "predictor"):
        if getattr(spec, key) is not None:
            b.problem(site.path + (key,), f"{key} is for per: token gates")
            return None
    name = f"gate {index}"
    got = b.controller(spec.policy, site.path + ("policy",), site.in_shape, ("gate_policy",))
    if got is None:
        b.program(
            spec.body, site.path + ("body",), site.in_shape, f"{name} body", name
        )  # its problems too
        return None
    ctl, key = got
    style = ctl.style
    if style == "token":
        b.problem(site.path + ("policy",), "a token_router routes per: token gates only")
        return None
    reads = [site.in_id]
    column, state_shape = 0, None
    try:
        site_mod = ctl.add_site(site.in_shape)
    except ValueError as e:
        b.problem(site.path + ("policy",), f"shape mismatch: {e}")
        return None
    if style == "ff":
        unit = b.unit(f"{name} policy", site_mod, [site.in_shape], construct=name)
    elif style == "recurrent":
        state_shape = ctl.state_shape
        unit = b.unit(f"{name} policy", site_mod, [site.in_shape, state_shape], construct=name)
    else:  # oneshot: one unit per policy, run at its first gate
        column = site_mod
        unit = b.shared.get(key)
        if unit is None:
            read_shape = b.shapes.get(ctl.reads)
            if read_shape is None:
                b.problem(
                    site.path + ("policy",),
                    f"blockdrop_policy reads '{ctl.reads}', which is not "
                    "the model input or a node before its first gate",
                )
                return None
            ctl.read_shape = read_shape
            unit = b.unit(f"{key} policy", ctl, [read_shape], construct=name)
            b.shared[key] = unit
            reads = [site.in_id, ctl.reads]
    body = token_gate.shape_keeping_body(spec, b, site, name, "skipped samples pass through")
    if body is None:
        return None
    return GateRuntime(
        index,
        spec.threshold,
        spec.train,
        body,
        unit,
        style,
        f"gate/{key}",
        column,
        state_shape,
        reads,
        site.node_id,
    ), site.in_shape


# ---------------------------------------------------------------- what generic code reads


def _start_stage(gates: list[GateRuntime], options: GateOptions) -> None:
    for g in gates:
        g.mode_override = options.decisions


def _before_step(gates: list[GateRuntime], options: GateOptions, step: int) -> None:
    """BlockDrop's curriculum: the first K - k gates always run; k grows by one every
    `curriculum_steps`."""
    k_total, every = len(gates), options.curriculum_steps
    k = k_total if not every else min(k_total, 1 + step // every)
    for i, g in enumerate(gates):
        g.forced_on = i < k_total - k


def _path_text(values: list[int], gates: list) -> str:
    per = [getattr(g, "per", "sample") for g in gates]
    ran = [str(i) for i, g in enumerate(values) if g == 1 and per[i] == "sample"]
    seen = sum(1 for i, g in enumerate(values) if g >= 0 and per[i] == "sample")
    routed = [f"gate {i} routes {v}" for i, v in enumerate(values) if per[i] == "token" and v >= 0]
    return "; ".join(([f"gates run {','.join(ran) or 'none'} of {seen}"] if seen else []) + routed)


GRID = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0]


def _sweep(model, gates: list):
    """Thresholds, or the capacities of Mixture-of-Depths gates where every gate has one."""
    cap = token_gate.capacity_gates(gates)
    if cap and len(cap) == len(gates):
        return attr_sweep("gate capacity", token_gate.CAPACITIES, gates, "capacity")
    return attr_sweep("gate threshold", GRID, gates, "threshold")


def force(g: GateRuntime, run: float) -> dict:
    """Benchmarks and tests (dyngraph.forcing): the body runs for a fraction `run` of the
    rows, drawn per sample from its input."""

    def on(x, p):
        u = pseudo_uniform(x, 100 + g.index)
        return u < const(run, u)

    def running(ctx, x, p):
        k, scale = ctx.kernels, draw_scale(100 + g.index)
        return None if k is None else kernels.draw_rows(k, x, kernels.DRAW_BELOW, run, scale)

    return {"on": on, "running": running}


GATE = register_construct(
    ConstructDef(
        key="gate",
        schema=GateSpec,
        build=build_gate,
        plural="gates",
        column=Column("gates", per_node=True, empty=-1, describe=_path_text),
        objective=gate_objective,
        options=GateOptions,
        legacy_options=LEGACY,
        start_stage=_start_stage,
        before_step=_before_step,
        thresholds=lambda gates: [(g, 0.0, 1.0) for g in gates],
        settings=("gates", ("threshold",)),
        methods={"set_decode": token_gate.set_decode},
        save_settings=token_gate.save_settings,
        load_settings=token_gate.load_settings,
        sweep=_sweep,
        sweep_rank=2,
        paths=lambda g, done, going: (done, going * 2),
        longest=token_gate.longest,
        force=force,
    )
)
