"""`exit`: early exits (MSDNet, BranchyNet, SCAN, DeeBERT, PABEE).

A head reads the node's input; samples that meet the criterion leave with its prediction, the
rest go on with the node's input unchanged. The last exit of a graph takes every sample left.

Criteria (one class each, below), on softmax(logits / temperature):
- `max_prob`: leave when the top probability >= threshold;
- `entropy`: leave when the entropy (nats) <= threshold;
- `patience` (PABEE): leave when the predicted class has stayed the same for `patience`
  consecutive exits (counted from the previous exit on).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import Field

from ..core.types import ModuleRef, Strict
from ..runtime import kernels
from ..runtime.context import const, draw_scale, positions, pseudo_uniform
from .api import Column, ConstructDef, Site, Sweep, attr_sweep
from .registry import register_construct

#: The criteria, each one class: its schema (`type:` and settings) and how it decides. A new
#: criterion is one more class here, marked @criterion; a fused kernel rule (`kernel`) is
#: optional, its ATen `stays` the reference.
CRITERIA: list[type] = []


def criterion(cls: type) -> type:
    CRITERIA.append(cls)
    return cls


@criterion
class MaxProb(Strict):
    """Leave when the top probability of softmax(logits / temperature) >= threshold."""

    type: Literal["max_prob"]
    threshold: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)

    kernel: ClassVar[int | None] = kernels.MAX_PROB_BELOW  # the kernels' rule of `stays`
    lowest: ClassVar[float] = 0.0  # the lowest threshold a model takes (above 1: never leave)
    grid: ClassVar[list[float] | None] = [
        0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.01,
    ]  # fmt: skip

    @staticmethod
    def score(z: torch.Tensor) -> torch.Tensor:
        # 1 / sum(exp(z - max z)), without softmax: its CPU kernel is slow on short rows
        # (256 x 10 logits: 52 us, against 15 us for these four ops)
        return (z - z.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_()

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx) -> torch.Tensor:
        score = confidence(logits, "max_prob", e.temperature)
        return score < const(e.threshold, score)


@criterion
class Entropy(Strict):
    """Leave when the entropy (nats) of softmax(logits / temperature) <= threshold."""

    type: Literal["entropy"]
    threshold: float = Field(ge=0.0)
    temperature: float = Field(1.0, gt=0.0)

    kernel: ClassVar[int | None] = kernels.ENTROPY_ABOVE
    lowest: ClassVar[float] = -math.inf  # below 0: never leave
    grid: ClassVar[list[float] | None] = [
        10.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, -1.0,
    ]  # fmt: skip

    @staticmethod
    def score(z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z, dim=1)
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx) -> torch.Tensor:
        score = confidence(logits, "entropy", e.temperature)
        return score > const(e.threshold, score)


@criterion
class Patience(Strict):
    """PABEE: leave when the predicted class has stayed the same for `patience` consecutive
    exits (counted from the previous exit on)."""

    type: Literal["patience"]
    patience: int = Field(ge=1)

    kernel: ClassVar[int | None] = None
    lowest: ClassVar[float] = -math.inf
    grid: ClassVar[list[float] | None] = None  # not swept: patience is a count

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        prev, count = ctx.states.get("exit/pred"), ctx.states.get("exit/count")
        count = torch.zeros_like(pred) if prev is None else torch.where(pred == prev, count + 1, 0)
        ctx.states["exit/pred"], ctx.states["exit/count"] = pred, count
        return count < e.patience


Criterion = Annotated[Union[tuple(CRITERIA)], Field(discriminator="type")]  # noqa: UP007
RULES = {c.model_fields["type"].annotation.__args__[0]: c for c in CRITERIA}


class Distill(Strict):
    """SCAN-style self-distillation of this exit from the last one (used in training)."""

    temperature: float = Field(3.0, gt=0.0)
    kl_weight: float = Field(0.5, ge=0.0, description="weight of KL(last exit || this exit) at T")
    feature_weight: float = Field(0.0, ge=0.0, description="weight of the L2 feature alignment")


class ExitSpec(Strict):
    """`exit: {head: MODULE, criterion: {...}, weight: 1.0, distill: {...}}`."""

    head: ModuleRef
    criterion: Criterion | None = None
    weight: float = Field(1.0, ge=0.0, description="weight of this exit's loss in training")
    distill: Distill | None = None


def confidence(logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """The score criterion `kind` thresholds (the top probability, the entropy).

    On the CPU it is the fused kernel's number where the criterion has a kernel rule (the one
    its decisions compare), so that a threshold set on these scores splits the samples as the
    infer runtime does."""
    rule = RULES[kind]
    d = logits.detach()
    o = kernels.ops(d)
    if rule.kernel is not None and o is not None and d.dim() == 2 and d.is_contiguous():
        return o.confidence(d, rule.kernel, temperature)
    return rule.score(logits if temperature == 1.0 else logits / temperature)


class ExitRuntime:
    """One exit in each execution mode.

    Args:
        index: the exit's number (its value in the trace's `exit` column).
        head: the head's unit.
        kind: the criterion (`max_prob`, `entropy`, `patience`), None for the last exit.
        threshold, temperature, patience: the criterion's settings.
        weight: its task loss weight; distill: its self-distillation settings (training).
        reads, writes: the id it reads and its node's id; head_shape: the head's output shape.
    """

    def __init__(
        self,
        index: int,
        head,
        kind: str | None,
        threshold: float | None,
        temperature: float,
        patience: int | None,
        weight: float,
        distill: Distill | None,
        reads: str,
        writes: str,
        head_shape,
    ):
        self.index, self.head, self.kind = index, head, kind
        self.rule = RULES.get(kind)  # the criterion's class (its decision code)
        self.threshold, self.temperature, self.patience = threshold, temperature, patience
        self.weight, self.distill = weight, distill
        self.reads, self.writes, self.head_shape = [reads], writes, head_shape
        self.last = False  # the graph's final exit (set by `_finish`)
        self.live_after: set[str] = set()

    @property
    def name(self) -> str:
        return f"exit {self.index}"

    def stays(self, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        """Which rows go on past this exit (bool, one per current row; not for the last exit)."""
        return self.rule.stays(self, logits, ctx)

    def staying(self, ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Infer: positions of the rows that go on, in one fused kernel call (None where the
        kernels do not apply: the caller runs `stays`)."""
        k = ctx.kernels
        if k is None:
            return None
        if self.rule.kernel is None or not kernels.applies(logits):
            return None
        return k.rows_where(logits, self.rule.kernel, self.threshold, self.temperature)

    def split(self, ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Infer: positions of the rows that go on (the fused kernel where it applies)."""
        staying = self.staying(ctx, logits, x)
        return positions(self.stays(logits, ctx, x)) if staying is None else staying

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): the head, then `split`; leaving rows' logits go
        to the output and the others' live values are compacted, as `run` does."""
        x = g.var(self.reads[0])
        g.line(f"z = {g.call(self.head, [x])}")
        if self.last:
            g.line(f"ctx.record('exit', None, {self.index})")
            g.line("ctx.leave(z, True)")
            g.line("ctx.rows = 0")
            g.line("return")
            return
        g.line(f"stay = {g.bind(self, f'exit{self.index}')}.split(ctx, z, {x})")
        g.line("n = stay.shape[0]")
        with g.block("if n != ctx.rows:"):
            g.line(f"ctx.record('exit', None, {self.index})")
            g.line("ctx.leave(z, n == 0)")
            with g.block("if n == 0:"):
                g.line("ctx.rows = 0")
                g.line("return")
            live = g.live(self.live_after)
            g.line(f"{g.values(live)}= ctx.compact(stay, [{g.values(live)}])")

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        logits = ctx.call(self.head, x)
        if not ctx.compacting:
            self._run_dense(ctx, x, logits)
            return
        if self.last:
            self._leave(ctx, logits, everyone=True)
            ctx.finish()
            return
        staying = self.staying(ctx, logits, x)
        if staying is not None:
            self._partition(ctx, logits, staying)
        elif ctx.rows == 1:  # one sample: one host sync, no index tensors
            if not bool(self.stays(logits, ctx, x)):
                self._leave(ctx, logits, everyone=True)
                ctx.finish()
        else:
            self._partition(ctx, logits, positions(self.stays(logits, ctx, x)))

    def _leave(self, ctx, logits: torch.Tensor, everyone: bool) -> None:
        """Infer: every current row outputs `logits` through this exit; the rows that stay are
        written again by the exit they do take (the last takes all)."""
        ctx.record("exit", None, self.index)
        ctx.leave(logits, everyone)

    def _partition(self, ctx, logits: torch.Tensor, staying: torch.Tensor) -> None:
        """Infer: the rows at `staying` go on, the others leave with `logits`."""
        n = staying.shape[0]
        if n == ctx.rows:  # nobody leaves
            return
        self._leave(ctx, logits, everyone=n == 0)
        if n == 0:
            ctx.finish()
        else:
            ctx.keep(staying, self.live_after)

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
    if (
        spec.criterion is not None
        and task.type != "classification"
        and spec.criterion.type != "patience"
    ):
        b.problem(
            site.path + ("criterion",),
            f"criterion '{spec.criterion.type}' needs a classification task",
        )
        return None
    if (
        spec.criterion is not None
        and spec.criterion.type == "patience"
        and task.type != "classification"
    ):
        b.problem(site.path + ("criterion",), "criterion 'patience' needs a classification task")
        return None
    head = b.module(spec.head, site.path + ("head",), [site.in_shape])
    if head is None:
        return None
    out = b.shapes_of(head, [site.in_shape], site.path + ("head",), "the exit head")
    if out is None:
        return None
    if task.type == "classification" and out != (task.classes,):
        b.problem(
            site.path + ("head",),
            f"shape mismatch: the head outputs {list(out)}; the task needs [{task.classes}] (classes)",
        )
        return None
    unit = b.unit(f"exit {index} head", head, [site.in_shape], construct=f"exit {index}", head=True)
    crit = spec.criterion
    runtime = ExitRuntime(
        index,
        unit,
        None if crit is None else crit.type,
        getattr(crit, "threshold", None),
        getattr(crit, "temperature", 1.0),
        getattr(crit, "patience", None),
        spec.weight,
        spec.distill,
        site.in_id,
        site.node_id,
        out,
    )
    return runtime, site.in_shape


def exit_objective(lc) -> dict[str, torch.Tensor]:
    """Weighted task loss over every exit (MSDNet); SCAN's self-distillation from the last exit:
    KL at temperature T (scaled by T^2) and an L2 alignment of the exit's layer-normalized input
    features with the last exit's (unnormalized, the alignment diverged: the residual stream's
    scale grew without bound)."""
    exits, logits = lc.model.exits, lc.out.extras.get("exit_logits")
    if not logits:
        return {}
    feats = lc.out.extras["exit_features"]
    weights = torch.tensor([e.weight for e in exits])
    task = (
        sum(w * lc.task_loss(z).mean() for w, z in zip(weights.tolist(), logits, strict=True))
        / weights.sum()
    )
    terms = {"task": task}
    last, last_feat = logits[-1].detach(), feats[-1].detach()
    kl = feat = 0.0
    n = max(
        sum(e.distill is not None for e in exits[:-1]), 1
    )  # averaged over exits, as the task loss
    for e, z, f in zip(exits[:-1], logits[:-1], feats[:-1], strict=True):
        d = e.distill
        if d is None:
            continue
        t = d.temperature
        kl = kl + d.kl_weight * t * t * torch.nn.functional.kl_div(
            torch.log_softmax(z / t, 1), torch.softmax(last / t, 1), reduction="batchmean"
        )
        if d.feature_weight:  # on layer-normalized features: the residual stream's scale is free
            norm = torch.nn.functional.layer_norm
            feat = (
                feat
                + d.feature_weight
                * (norm(f, f.shape[1:]) - norm(last_feat, f.shape[1:])).pow(2).mean()
            )
    if torch.is_tensor(kl):
        terms["distill_kl"] = kl / n
    if torch.is_tensor(feat):
        terms["distill_features"] = feat / n
    lc.task_replaced = True
    return terms


# ---------------------------------------------------------------- what generic code reads


def _finish(exits: list[ExitRuntime], b) -> tuple | None:
    """The last exit takes every sample left; only it may go without a criterion; a graph
    with exits ends with one. The model's output has the heads' shape."""
    exits[-1].last = True
    for e in exits[:-1]:
        if e.kind is None:
            b.problem(
                b.path_of(e) + ("exit",),
                f"{e.name} has no criterion: only the graph's last exit may leave it out (it "
                "takes every sample left); add e.g. `criterion: {type: max_prob, threshold: 0.9}`",
            )
    key, path = b.graph_end
    if key != "exit":
        b.problem(
            path, "a graph with exits must end with an exit (the last exit takes every sample left)"
        )
    return exits[-1].head_shape


def _thresholds(exits: list[ExitRuntime]) -> list[tuple]:
    # max_prob above 1 (or entropy below 0) means "never leave here"
    return [(e, e.rule.lowest, math.inf) for e in exits[:-1]]


def _save(exits: list[ExitRuntime]) -> list:
    return [{"threshold": e.threshold, "temperature": e.temperature} for e in exits]


def _load(exits: list[ExitRuntime], values: list) -> None:
    for e, v in zip(exits, values, strict=False):
        e.threshold, e.temperature = v["threshold"], v["temperature"]


def _sweep(model, exits: list[ExitRuntime]) -> Sweep | None:
    """The threshold of every exit whose criterion has a grid (the first such criterion's,
    where exits use several)."""
    swept = [e for e in exits[:-1] if e.rule is not None and e.rule.grid is not None]
    if not swept:
        return None
    rule = next(c for c in CRITERIA if any(e.rule is c for e in swept))
    kind = rule.model_fields["type"].annotation.__args__[0]
    return attr_sweep(
        f"exit threshold ({kind})", rule.grid, [e for e in swept if e.rule is rule], "threshold"
    )


@torch.no_grad()
def fit_temperatures(model, exits: list[ExitRuntime], val, batch_size: int = 512) -> dict:
    """Per exit, the temperature minimizing the validation NLL (post-hoc temperature scaling)."""
    if val.y is None or model.spec.task.type != "classification":
        return {}
    logits = [[] for _ in exits]
    for i in range(0, len(val), batch_size):
        out = model(val.x[i : i + batch_size], mode="dense")
        for e, z in enumerate(out.extras["exit_logits"]):
            logits[e].append(z)
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 200)
    temps = []
    for e, zs in zip(exits, logits, strict=True):
        z = torch.cat(zs)
        nll = torch.stack([torch.nn.functional.cross_entropy(z / t, val.y) for t in grid])
        e.temperature = float(grid[int(nll.argmin())])
        temps.append(e.temperature)
    return {"temperatures": temps}


def _paths(e: ExitRuntime, done: int, going: int) -> tuple[int, int]:
    return done + going, 0 if e.last else going


def exit_macs(model, exits: list[ExitRuntime], counter: str = "fvcore") -> list[int]:
    """Cumulative static MACs of a sample leaving at each exit (every earlier unit once)."""
    macs = model.unit_macs(counter)
    weights = model.max_path_counts()
    out = []
    for e in exits:
        upto = torch.tensor([u.order[0] <= e.head.order[0] for u in model.units])
        out.append(int((macs * weights * upto).sum()))
    return out


def _describe(model, exits: list[ExitRuntime], counter: str) -> list[str]:
    lines = ["", "exits (cumulative MACs of a sample leaving there):"]
    full = exit_macs(model, exits, counter)
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


def force(exits: list[ExitRuntime], leave: float | None) -> None:
    """Benchmarks and tests: every exit but the last lets a fraction `leave` of the samples
    leave, drawn per sample from its input (the same in any batch); None: the criteria again."""
    for e in exits[:-1]:
        if leave is None:
            e.__dict__.pop("stays", None)
            e.__dict__.pop("staying", None)
            continue

        def stays(logits, ctx, x, e=e):
            u = pseudo_uniform(x, e.index)
            return u >= const(leave, u)

        def staying(ctx, logits, x, e=e):
            k = ctx.kernels
            scale = draw_scale(e.index)
            return (
                None if k is None else kernels.draw_rows(k, x, kernels.DRAW_AT_LEAST, leave, scale)
            )

        e.stays, e.staying = stays, staying


def _path_text(values: list[int], exits: list) -> str | None:
    return f"exit {values[0]}" if values[0] >= 0 else None


EXIT = register_construct(
    ConstructDef(
        key="exit",
        schema=ExitSpec,
        build=build_exit,
        plural="exits",
        column=Column("exit", per_node=False, empty=-1, describe=_path_text),
        objective=exit_objective,
        passes_input=True,
        finish=_finish,
        thresholds=_thresholds,
        settings_key="exits",
        save_settings=_save,
        load_settings=_load,
        sweep=_sweep,
        sweep_rank=0,
        calibrate=fit_temperatures,
        paths=_paths,
        describe=_describe,
        docs=_docs,
        force=force,
    )
)
