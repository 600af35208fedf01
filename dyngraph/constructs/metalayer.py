"""`metalayer`: Composer (Odena et al.): a controller picks one choice per sample.

The controller (composer_rnn, usually one shared by every metalayer) sees the activation and the
preference values gamma, and scores the choices. Infer: the argmax; each choice runs once per
batch on the samples routed to it (grouped dispatch, like MoE routing). Train: a choice is
sampled (a fraction `explore` of samples routed uniformly at random, which keeps the policy from
locking onto one rule), with its log-prob, for REINFORCE.

gamma: per preference, sampled from its `train` distribution in training (one value per sample,
the same at every metalayer of a forward pass); at test time the `test` value, which can be
changed on a compiled model with `model.set_gamma(...)` without recompiling.

`per: token` picks a choice for each token instead, each run on its tokens (token_metalayer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.types import ModuleRef, Strict
from ..runtime import kernels
from ..runtime.context import draw_scale, pseudo_uniform
from . import metalayer_settings, token_metalayer
from .api import Column, ConstructDef, Site
from .metalayer_objective import metalayer_objective
from .registry import register_construct


class MetalayerSpec(Strict):
    """`metalayer: {choices: [MODULE, ...], controller: CONTROLLER, explore: 0.1}`."""

    choices: list[ModuleRef | list[ModuleRef]] = Field(
        min_length=2, description="modules, or lists run in order"
    )
    controller: ModuleRef
    explore: float = Field(
        0.0, ge=0.0, le=1.0, description="fraction of samples routed at random in training"
    )
    per: Literal["sample", "token"] = Field(
        "sample",
        description="token: a choice per token, each choice run on its tokens as a shorter "
        "sequence",
    )


class MetalayerOptions(Strict):
    """`metalayer:` in a training stage: routing and the Composer objective's weights."""

    explore: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fraction of samples routed at random during this stage (default: each metalayer's `explore`)",
    )
    entropy_cost: float = Field(0.0, ge=0, description="Composer batch-entropy cost weight")
    policy_weight: float = Field(1.0, ge=0, description="weight of the REINFORCE and cost terms")


#: keys of earlier specs: a stage's `explore:` and its `objective:`'s Composer keys
LEGACY = {"explore": "explore", "entropy_cost": "entropy_cost", "policy_weight": "policy_weight"}


@dataclass(eq=False)
class MetalayerRuntime:
    """One metalayer in each execution mode."""

    index: int
    explore: float
    choice_names: list[str]
    choices: list[Any]  # a unit per choice
    router: Any  # the controller's unit at this site
    key: str  # the controller's state in the run context
    ctl_name: str
    ctl: Any  # the controller module (its preferences)
    gamma_test: dict[str, float]  # set_gamma's values, shared by the controller's sites
    state_shape: tuple
    choice_params: torch.Tensor  # [choices] parameters of each choice (the Composer cost)
    reads: list[str]
    writes: str
    out_shape: tuple
    explore_override: float | None = None  # a training stage's `explore:`
    per: str = "sample"  # or "token" (token_metalayer.py)
    length: int = 0  # per token: the longest sequence (its trace code's base, minus one)
    route_all: bool = False  # per token: every choice runs on every token (costs counted)
    live_after: set[str] = field(default_factory=set)
    _gamma_cache: dict = field(default_factory=dict)
    _edges: tuple = (None, None)

    @property
    def name(self) -> str:
        return f"metalayer {self.index}"

    def gamma(self, ctx, n: int, like: torch.Tensor) -> torch.Tensor:
        """[rows, preferences]: sampled once per forward in training, else the test values."""
        key = f"gamma/{self.key}"
        if key not in ctx.states:
            if ctx.mode == "train":
                cols = [p.gamma.train.sample(n) for p in self.ctl.preferences.values()]
                g = torch.stack(cols, dim=1) if cols else torch.zeros(n, 0)
                ctx.states[key] = g.to(device=like.device, dtype=like.dtype)
            else:  # the test values: one tensor per (rows, values), reused across forward passes
                values = tuple(metalayer_settings.gamma_values(self))
                ck = (n, values, like.device, like.dtype)
                if self._gamma_cache.get("key") != ck:
                    g = (
                        torch.tensor(values, dtype=like.dtype)
                        .expand(n, len(values))
                        .contiguous()
                        .to(like.device)
                    )
                    self._gamma_cache = {"key": ck, "value": g}
                ctx.states[key] = self._gamma_cache["value"]
        return ctx.states[key]

    def scores(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """The controller's scores [rows, choices] (per token [rows, L, choices]); its state
        goes on to the next metalayer."""
        h = ctx.states.get(self.key)
        if h is None:  # per token: a state for each token
            h = x.new_zeros((*x.shape[: 2 if self.per == "token" else 1], *self.state_shape))
        seen = x.detach() if x.requires_grad else x  # policy terms train the controller only
        g = self.gamma(ctx, x.shape[0], x)
        logits, ctx.states[self.key] = ctx.call(self.router, seen, h, g)
        return logits

    def pick(self, ctx, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The choice of each row: the top score (infer, dense) or sampled (train)."""
        if self.per == "token":
            return token_metalayer.pick(self, ctx, logits)
        if ctx.mode != "train":
            return logits.argmax(dim=1)
        c = torch.multinomial(torch.softmax(logits.detach(), dim=1), 1).squeeze(1)
        explore = self.explore if self.explore_override is None else self.explore_override
        if explore > 0:
            rand = torch.rand(c.shape, device=c.device) < explore
            c = torch.where(rand, torch.randint_like(c, len(self.choices)), c)
        return c

    def grouped(self, ctx, x: torch.Tensor, logits: torch.Tensor) -> tuple | None:
        """Infer: (choice per row, rows grouped by choice, count per choice) in one fused
        kernel call (None where the kernels do not apply)."""
        k = ctx.kernels
        if k is None:
            return None
        return self._choose(k, logits, kernels.ARGMAX, None)

    def _choose(self, k, t: torch.Tensor, rule: int, probs: list[float] | None) -> tuple | None:
        """The kernels' grouped choice on `t` by `rule` (a draw with probabilities `probs`)."""
        if not kernels.applies(t):
            return None
        c, order, counts = k.choose(t, rule, self.edges(t, probs), draw_scale(200 + self.index))
        return c, order, counts + [0] * (len(self.choices) - len(counts))

    def edges(self, like: torch.Tensor, probs: list[float] | None) -> torch.Tensor:
        """Cumulative probabilities of a draw (none for the argmax), cached."""
        key = (None if probs is None else tuple(probs), like.device, like.dtype)
        if self._edges[0] != key:
            e = torch.tensor(probs or [0.0], device=like.device, dtype=like.dtype)
            self._edges = (key, e.cumsum(0)[:-1])
        return self._edges[1]

    def _extras(self, ctx, logits: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> None:
        """Train mode: what the Composer objective reads."""
        logp = torch.log_softmax(logits, dim=1).gather(1, c[:, None]).squeeze(1)
        ctx.extras["choices"].append(
            {
                "logits": logits,
                "action": c,
                "logp": logp,
                "gamma": ctx.states[f"gamma/{self.key}"],
                "params": self.choice_params.to(x.device)[c],
            }
        )

    def run(self, ctx) -> None:
        ctx.env[self.writes] = self.apply(ctx, ctx.env[self.reads[0]])

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it)."""
        return {"kind": "metalayer", "index": self.index, "router": self.router.index,
                "choices": [u.index for u in self.choices], "key": self.key,
                "state_shape": list(self.state_shape), "controller": self.ctl_name,
                "gamma": metalayer_settings.gamma_values(self), "per": self.per,
                "length": self.length, "per_token": [bool(u.per_token) for u in self.choices],
                "reads": list(self.reads), "writes": self.writes}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `apply` on the local it reads."""
        x = g.var(self.reads[0])
        g.assign(self.writes, f"{g.bind(self, f'metalayer{self.index}')}.apply(ctx, {x})")

    def apply(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """The node's output for the current rows, in the context's mode."""
        if self.per == "token":
            return token_metalayer.apply(self, ctx, x)
        logits = self.scores(ctx, x)
        got = self.grouped(ctx, x, logits)
        if got is not None:
            c, order, counts = got
            ctx.record("choices", self.index, c)
            return ctx.dispatch(self.choices, x, order, counts, self.out_shape)
        c = self.pick(ctx, x, logits)
        ctx.record("choices", self.index, c)
        if ctx.mode == "dense":
            y = None
            for j, unit in enumerate(self.choices):
                yj = ctx.call(unit, x, count=c == j)
                sel = (c == j).view(-1, *([1] * (yj.dim() - 1)))
                y = yj if y is None else torch.where(sel, yj, y)
            return y
        if x.shape[0] == 1:  # one sample: one host sync, no bincount
            y = ctx.call(self.choices[int(c)], x)
        else:
            counts = torch.bincount(c, minlength=len(self.choices)).tolist()  # one host sync
            # rows grouped by choice with one sort: each group's positions are a slice of it
            order = None if max(counts) == x.shape[0] else torch.sort(c, stable=True).indices
            y = ctx.dispatch(self.choices, x, order, counts, self.out_shape)
        if ctx.mode == "train":
            self._extras(ctx, logits, c, x)
        return y


def choice_label(choice) -> str:
    """A short name of a choice: its module name(s) or block type(s)."""
    items = choice if isinstance(choice, list) else [choice]
    return "+".join(c if isinstance(c, str) else c.type for c in items)


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_metalayer(spec: MetalayerSpec, b, site: Site) -> tuple[MetalayerRuntime, tuple] | None:
    """Check and build one metalayer node."""
    index = b.next_index("metalayer", column="choices")
    name = f"metalayer {index}"
    got = b.controller(spec.controller, site.path + ("controller",), site.in_shape, ("router",))
    unit, tokens = None, spec.per == "token"
    if got is not None:
        ctl, key = got
        if tokens and not token_metalayer.check(b, site, ctl, len(spec.choices)):
            return None
        if not tokens and getattr(ctl, "per_token", False):
            b.problem(
                site.path + ("per",),
                "a controller decides per sample or per token at every metalayer it serves, "
                "not both",
            )
            return None
        ctl.per_token = tokens
        router = ctl.add_site(site.in_shape, len(spec.choices), per_token=tokens)
        state = (site.in_shape[0], *ctl.state_shape) if tokens else ctl.state_shape
        unit = b.unit(
            f"{name} controller", router, [site.in_shape, state, (ctl.n_pref,)], construct=name
        )
    units, shapes = [], []
    for j, choice in enumerate(spec.choices):
        label = choice_label(choice)
        u, out = b.program(
            choice, site.path + ("choices", j), site.in_shape, f"{name} choice {j} ({label})", name
        )
        if u is not None and tokens:
            path = site.path + ("choices", j)
            u = u if token_metalayer.check_choice(b, path, site.in_shape, out) else None
        units.append(u)
        shapes.append(out)
    if unit is None or any(u is None for u in units):
        return None
    if len(set(shapes)) != 1:
        b.problem(
            site.path + ("choices",),
            f"shape mismatch: every choice must output the same shape, got {[list(s) for s in shapes]}",
        )
        return None
    params = [_n_params(u.module) for u in units]
    rt = MetalayerRuntime(
        index,
        spec.explore,
        [choice_label(c) for c in spec.choices],
        units,
        unit,
        f"router/{key}",
        key,
        ctl,
        b.shared.setdefault(f"gamma/{key}", {}),
        ctl.state_shape,
        torch.tensor(params, dtype=torch.float32),
        [site.in_id],
        site.node_id,
        shapes[0],
        per=spec.per,
        length=site.in_shape[0] if tokens else 0,
    )
    return rt, shapes[0]


# ---------------------------------------------------------------- what generic code reads


def _start_stage(metalayers: list[MetalayerRuntime], options: MetalayerOptions) -> None:
    for m in metalayers:
        m.explore_override = options.explore


def _path_text(values: list[int], metalayers: list) -> str:
    pairs = list(zip(metalayers, values, strict=True))
    names = [m.choice_names[c] if c >= 0 else "-" for m, c in pairs if m.per == "sample"]
    tokens = [token_metalayer.describe(m, c) for m, c in pairs if m.per == "token" and c >= 0]
    return "; ".join((["choices " + "→".join(names)] if names else []) + tokens)


def _longest(m: MetalayerRuntime, counts: torch.Tensor, macs: torch.Tensor) -> None:
    """The costliest choice."""
    best = max(m.choices, key=lambda u: int(macs[u.index]))
    for u in m.choices:
        counts[u.index] = int(u is best)


def force(m: MetalayerRuntime, probs: list[float]) -> dict:
    """Benchmarks and tests (dyngraph.forcing): route with probabilities `probs` (one per
    choice), drawn per sample from its input."""

    def pick(ctx, x, logits):
        u = pseudo_uniform(x, 200 + m.index)
        return torch.bucketize(u, m.edges(u, probs), right=True)

    if m.per == "token":
        return {"pick": token_metalayer.forced_pick(m, probs)}

    def grouped(ctx, x, logits):
        k = ctx.kernels
        return None if k is None else m._choose(k, x, kernels.DRAW_BUCKET, probs)

    return {"pick": pick, "grouped": grouped}


METALAYER = register_construct(
    ConstructDef(
        key="metalayer",
        schema=MetalayerSpec,
        build=build_metalayer,
        plural="metalayers",
        column=Column("choices", per_node=True, empty=-1, describe=_path_text),
        objective=metalayer_objective,
        options=MetalayerOptions,
        legacy_options=LEGACY,
        start_stage=_start_stage,
        settings=("gamma", ()),
        save_settings=metalayer_settings.save,
        load_settings=metalayer_settings.load,
        sweep=metalayer_settings.sweep,
        sweep_rank=1,
        paths=lambda m, done, going: (done, going * len(m.choices)),
        longest=_longest,
        methods={"set_gamma": metalayer_settings.set_gamma},
        force=force,
    )
)
