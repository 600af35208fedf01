"""`exit`: early exits (MSDNet, BranchyNet, SCAN, DeeBERT, PABEE).

A head reads the node's input; samples that meet the criterion (below) leave with its
prediction, the rest go on with the node's input unchanged. The last exit of a graph takes
every sample left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.types import ModuleRef, Strict
from ..runtime import kernels
from ..runtime.context import const, draw_scale, positions, pseudo_uniform
from ..tasks import IGNORE
from .api import Column, ConstructDef, Site, Sweep, attr_sweep
from .exit_criteria import CRITERIA, RULES, Criterion, confidence, criterion  # noqa: F401
from .registry import register_construct
from .token_exit import build_token_exit, exit_head


class ExitOptions(Strict):
    """A stage's options for exits (`exit: {only_last: true}`)."""

    only_last: bool = Field(
        False,
        description="train on the last exit's loss alone: DeeBERT's first stage (the backbone "
        "and the last head); its second trains the other heads (`trainable: [heads]`)",
    )


class Distill(Strict):
    """SCAN-style self-distillation of this exit from the last one (used in training)."""

    temperature: float = Field(3.0, gt=0.0)
    kl_weight: float = Field(0.5, ge=0.0, description="weight of KL(last exit || this exit) at T")
    feature_weight: float = Field(0.0, ge=0.0, description="weight of the L2 feature alignment")


class ExitSpec(Strict):
    """`exit: {head: MODULE, criterion: {...}, weight: 1.0, distill: {...}}`."""

    head: ModuleRef
    per: Literal["sample", "token"] = Field(
        "sample",
        description="`token`: each token leaves on its own, its state frozen for later layers "
        "(CALM; token_exit.py); needs a per-token task and a per-token head",
    )
    criterion: Criterion | None = None
    weight: float = Field(1.0, ge=0.0, description="weight of this exit's loss in training")
    distill: Distill | None = None


@dataclass(eq=False)
class ExitRuntime:
    """One exit in each execution mode: its head's unit, its criterion (`kind`: None for the
    last exit) and settings, its loss weight and self-distillation (training)."""

    index: int  # its value in the trace's `exit` column
    head: Any
    kind: str | None
    threshold: float | None
    temperature: float
    patience: int | None
    weight: float
    distill: Distill | None
    reads: list[str]
    writes: str
    head_shape: tuple
    last: bool = False  # the graph's final exit (set by `_finish`)
    live_after: set[str] = field(default_factory=set)
    per = "sample"  # (token_exit.py: per token)
    leaves_rows = True  # rows leave the pass here (streaming: a stage ends after it)

    def __post_init__(self) -> None:
        self.rule = RULES.get(self.kind)  # the criterion's class (its decision code)

    @property
    def name(self) -> str:
        return f"exit {self.index}"

    def stays(self, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        """Which rows go on past this exit (bool, one per current row; not for the last exit)."""
        return self.rule.stays(self, logits, ctx, x)

    def staying(self, ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Infer: positions of the rows that go on, in one fused kernel call (None where the
        kernels do not apply: the caller runs `stays`)."""
        k = ctx.kernels
        if k is None or self.rule.kernel is None or not kernels.applies(logits):
            return None
        return k.rows_where(logits, self.rule.kernel, self.threshold, self.temperature)

    def split(self, ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Infer: positions of the rows that go on (the fused kernel where it applies)."""
        staying = self.staying(ctx, logits, x)
        return positions(self.stays(logits, ctx, x)) if staying is None else staying

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it)."""
        return {"kind": "exit", "index": self.index, "head": self.head.index,
                "criterion": self.kind, "threshold": self.threshold,
                "temperature": self.temperature, "patience": self.patience,
                "reads": list(self.reads), "live_after": sorted(self.live_after),
                "last": self.last}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py), as `run`: the head, then `split`, the part."""
        x = g.var(self.reads[0])
        g.line(f"z = {g.call(self.head, [x])}")
        if self.last:
            g.leave_all("z", self.index)
        else:
            split = f"{g.bind(self, f'exit{self.index}')}.split(ctx, z, {x})"
            g.part(split, "z", self.index, self.live_after)

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        logits = ctx.call(self.head, x)
        if not ctx.compacting:
            self._run_dense(ctx, x, logits)
            return
        if not self.last:
            staying = self.staying(ctx, logits, x)
            if staying is None and ctx.rows > 1:
                staying = positions(self.stays(logits, ctx, x))
            if staying is not None:
                if staying.shape[0] != ctx.rows:  # some rows leave, here
                    ctx.part(staying, logits, self.index, self.live_after)
                return
            if bool(self.stays(logits, ctx, x)):  # one sample: one host sync, no indices
                return
        ctx.leave(logits, self.index, everyone=True)
        ctx.finish()

    def _run_dense(self, ctx, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Dense/train: every row goes on; the live rows that would leave here output `logits`."""
        if self.last:
            leave = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            leave = ~self.stays(logits, ctx, x)
        ctx.extras["exit_logits"].append(logits)
        ctx.extras["exit_features"].append(x)
        ctx.record("exit", None, self.index, where=leave)
        ctx.emit(leave, logits)
        ctx.live = ctx.live & ~leave


def build_exit(spec: ExitSpec, b, site: Site) -> tuple[ExitRuntime, tuple] | None:
    """Check and build one exit node."""
    index = b.next_index("exit")
    task = b.spec.task
    c = spec.criterion
    crit = {
        k: getattr(c, k, d)
        for k, d in (("threshold", None), ("temperature", 1.0), ("patience", None))
    }
    if spec.per == "token":
        return build_token_exit(spec, b, site, index, crit)
    if c is not None and c.type == "learned":
        b.problem(
            site.path + ("criterion",),
            "criterion 'learned' (a stop unit on each token's state) decides per token: "
            "add `per: token`, or use max_prob, entropy or patience per sample",
        )
        return None
    if spec.criterion is not None and (task.type != "classification" or task.per == "token"):
        b.problem(
            site.path + ("criterion",),
            f"criterion '{spec.criterion.type}' needs a classification task per sample "
            "(a per-token task's exits decide per token: `per: token`)",
        )
        return None
    got = exit_head(spec, b, site)
    if got is None:
        return None
    head, out = got
    if task.type == "classification" and out != (task.classes,):
        b.problem(
            site.path + ("head",),
            f"shape mismatch: the head outputs {list(out)}; the task needs [{task.classes}] (classes)",
        )
        return None
    unit = b.unit(f"exit {index} head", head, [site.in_shape], construct=f"exit {index}", head=True)
    kind = None if c is None else c.type
    rt = ExitRuntime(index, unit, kind, **crit, weight=spec.weight, distill=spec.distill,
                     reads=[site.in_id], writes=site.node_id, head_shape=out)  # fmt: skip
    return rt, site.in_shape


def exit_objective(lc) -> dict[str, torch.Tensor]:
    """Weighted task loss over every exit (MSDNet); SCAN's self-distillation from the last exit:
    KL at temperature T (scaled by T^2) and an L2 alignment of the exit's layer-normalized input
    features with the last exit's (unnormalized, the alignment diverged: the residual stream's
    scale grew without bound)."""
    exits, logits = lc.model.exits, lc.out.extras.get("exit_logits")
    if not logits:
        return {}
    feats = lc.out.extras["exit_features"]
    if lc.options is not None and lc.options.only_last:
        lc.task_replaced = True
        return {"task": lc.task_loss(logits[-1]).mean()}
    weights = torch.tensor([e.weight for e in exits])
    task = (
        sum(w * lc.task_loss(z).mean() for w, z in zip(weights.tolist(), logits, strict=True))
        / weights.sum()
    )
    terms = {"task": task}
    last, last_feat = logits[-1].detach(), feats[-1].detach()
    kl = feat = 0.0
    n = max(sum(e.distill is not None for e in exits[:-1]), 1)  # a mean over exits, as the task's
    norm = torch.nn.functional.layer_norm
    for e, z, f in zip(exits[:-1], logits[:-1], feats[:-1], strict=True):
        d = e.distill
        if d is None:
            continue
        t, token = d.temperature, e.per == "token"  # per token: a mean over tokens
        zs, ls = (z.flatten(0, -2), last.flatten(0, -2)) if token else (z, last)
        kl = kl + d.kl_weight * t * t * torch.nn.functional.kl_div(
            torch.log_softmax(zs / t, -1), torch.softmax(ls / t, -1), reduction="batchmean"
        )
        if d.feature_weight:  # on layer-normalized features: the residual stream's scale is free
            dims = f.shape[-1:] if token else f.shape[1:]
            gap = (norm(f, dims) - norm(last_feat, dims)).pow(2).mean()
            feat = feat + d.feature_weight * gap
    if lc.out.extras.get("exit_stop"):
        terms["stop"] = stop_loss(lc, logits, lc.out.extras["exit_stop"])
    if torch.is_tensor(kl):
        terms["distill_kl"] = kl / n
    if torch.is_tensor(feat):
        terms["distill_features"] = feat / n
    lc.task_replaced = True
    return terms


def stop_loss(
    lc, logits: list[torch.Tensor], stops: list[tuple[int, torch.Tensor]]
) -> torch.Tensor:
    """Criterion `learned` (per token): each stop unit's binary cross-entropy towards "going
    deeper would not make this token right" (1 where its exit's prediction is correct or the
    last exit's is wrong too), over the labelled tokens; a mean over the exits. The targets
    are the model's own predictions, detached; the stop units read detached states."""
    y = lc.y
    labelled = y != IGNORE
    last_wrong = logits[-1].detach().argmax(-1) != y
    total = 0.0
    for k, s in stops:
        target = (logits[k].detach().argmax(-1) == y) | last_wrong
        total = total + torch.nn.functional.binary_cross_entropy_with_logits(
            s[labelled], target[labelled].to(s.dtype)
        )
    return total / len(stops)


# ---------------------------------------------------------------- what generic code reads


def _finish(exits: list[ExitRuntime], b) -> tuple | None:
    """The last exit takes every sample left; only it may go without a criterion; a graph
    with exits ends with one. The model's output has the heads' shape."""
    exits[-1].last = True
    for e in (e for e in exits[:-1] if e.kind is None):
        b.problem(
            b.path_of(e) + ("exit",),
            f"{e.name} has no criterion: only the graph's last exit may leave it out (it "
            "takes every sample left); add e.g. `criterion: {type: max_prob, threshold: 0.9}`",
        )
    if b.graph_end[0] != "exit":
        b.problem(
            b.graph_end[1],
            "a graph with exits must end with an exit (the last exit takes every sample left)",
        )
    return exits[-1].head_shape


def _sweep(model, exits: list[ExitRuntime]) -> Sweep | None:
    """The threshold of the exits whose criterion has a grid (the first criterion's, where
    exits use several)."""
    swept = [e for e in exits[:-1] if e.rule is not None and e.rule.grid is not None]
    rule = next((c for c in CRITERIA if any(e.rule is c for e in swept)), None)  # the first
    if rule is None:
        return None
    kind = rule.model_fields["type"].annotation.__args__[0]
    chosen = [e for e in swept if e.rule is rule]
    return attr_sweep(f"exit threshold ({kind})", rule.grid, chosen, "threshold")


@torch.no_grad()
def fit_temperatures(model, exits: list[ExitRuntime], val, batch_size: int = 512) -> dict:
    """Per exit, the temperature minimizing the validation NLL (post-hoc temperature scaling)."""
    if val.y is None or model.spec.task.type != "classification":
        return {}
    batches = range(0, len(val), batch_size)
    outs = [model(val.x[i : i + batch_size], mode="dense").extras["exit_logits"] for i in batches]
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 200)
    y = val.y.flatten()  # per token: every labelled position (IGNORE: padding)
    for k, e in enumerate(exits):
        z = torch.cat([o[k] for o in outs]).flatten(0, -2)
        nll = torch.stack(
            [torch.nn.functional.cross_entropy(z / t, y, ignore_index=IGNORE) for t in grid]
        )
        e.temperature = float(grid[int(nll.argmin())])
    return {"temperatures": [e.temperature for e in exits]}


def _describe(model, exits: list[ExitRuntime], counter: str) -> list[str]:
    """The cumulative static MACs of a sample leaving at each exit (every earlier unit once)."""
    weighted = model.unit_macs(counter) * model.max_path_counts()
    step = torch.tensor([u.order[0] for u in model.units])  # the plan step of each unit
    full = [int(weighted[step <= e.head.order[0]].sum()) for e in exits]
    lines = ["", "exits (cumulative MACs of a sample leaving there):"]
    for e, m in zip(exits, full, strict=True):
        crit = (
            "takes every sample left"
            if e.last
            else f"{e.kind} {e.threshold if e.threshold is not None else e.patience}"
        )
        lines.append(f"  exit {e.index}: {m:>12,} MACs ({m / full[-1]:.0%} of the last)  [{crit}]")
    return lines


def _docs(table) -> list[str]:
    lines = table(ExitSpec) + ["", "Criteria (`criterion: {type: ...}`):", ""]
    for m in CRITERIA:
        doc = " ".join((m.__doc__ or "").split())
        lines += [f"`{m.model_fields['type'].annotation.__args__[0]}`: {doc}", ""]
        lines += table(m, ("type",)) + [""]
    return lines + ["`distill:` (SCAN self-distillation, used in training):", ""] + table(Distill)


def force(e: ExitRuntime, leave: float) -> dict:
    """Benchmarks and tests (dyngraph.forcing): every exit but the last lets a fraction
    `leave` of the rows leave, drawn per sample from its input."""
    if e.last:
        return {}

    def stays(logits, ctx, x):
        u = pseudo_uniform(x, e.index)
        return u >= const(leave, u)

    def staying(ctx, logits, x):
        k, scale = ctx.kernels, draw_scale(e.index)
        return None if k is None else kernels.draw_rows(k, x, kernels.DRAW_AT_LEAST, leave, scale)

    def stay_rule(ctx, logits, x):  # (a per-token exit's, TokenExitRuntime.stay_rule)
        if kernels.applies(x):
            return x, kernels.DRAW_AT_LEAST, leave, draw_scale(e.index)
        return stays(logits, ctx, x), kernels.TRUE, 0.0, 0.0

    return {"stays": stays, "staying": staying, "stay_rule": stay_rule}


EXIT = register_construct(
    ConstructDef(
        key="exit",
        schema=ExitSpec,
        build=build_exit,
        plural="exits",
        column=Column("exit", False, -1, lambda v, _: f"exit {v[0]}" if v[0] >= 0 else None),
        objective=exit_objective,
        options=ExitOptions,
        passes_input=True,
        finish=_finish,
        # a max_prob threshold above 1 (an entropy below 0) means "never leave here"
        thresholds=lambda exits: [(e, e.rule.lowest, math.inf) for e in exits[:-1]],
        settings=("exits", ("threshold", "temperature")),
        sweep=_sweep,
        sweep_rank=0,
        calibrate=fit_temperatures,
        paths=lambda e, done, going: (done + going, 0 if e.last else going),
        describe=_describe,
        docs=_docs,
        force=force,
    )
)
