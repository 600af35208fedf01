"""`exit`: early exits (MSDNet, BranchyNet, SCAN, DeeBERT, PABEE).

A head reads the node's input; samples that meet the criterion leave with its prediction, the
rest go on with the node's input unchanged. The last exit of a graph takes every sample left.

Criteria, on softmax(logits / temperature):
- `max_prob`: leave when the top probability >= threshold;
- `entropy`: leave when the entropy (nats) <= threshold;
- `patience` (PABEE): leave when the predicted class has stayed the same for `patience`
  consecutive exits (counted from the previous exit on).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import Field

from ..runtime import kernels
from ..runtime.context import const, draw_scale, positions, pseudo_uniform
from ..spec.types import ModuleRef, Strict
from .registry import register_construct, register_objective


class MaxProb(Strict):
    type: Literal["max_prob"]
    threshold: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)


class Entropy(Strict):
    type: Literal["entropy"]
    threshold: float = Field(ge=0.0)
    temperature: float = Field(1.0, gt=0.0)


class Patience(Strict):
    type: Literal["patience"]
    patience: int = Field(ge=1)


Criterion = Annotated[Union[MaxProb, Entropy, Patience], Field(discriminator="type")]  # noqa: UP007


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
    """The score a criterion thresholds: top probability or (for `entropy`) the entropy.

    On the CPU it is the fused kernel's number (the one its decisions compare), so that a
    threshold set on these scores splits the samples as the infer runtime does."""
    d = logits.detach()
    o = kernels.ops(d)
    if o is not None and d.dim() == 2 and d.is_contiguous():
        return o.confidence(d, kernels.KINDS[kind], temperature)
    z = logits if temperature == 1.0 else logits / temperature
    if kind == "max_prob":  # 1 / sum(exp(z - max z)), without softmax: its CPU kernel is slow on
        # short rows (256 x 10 logits: 52 us, against 15 us for these four ops)
        return (z - z.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_()
    p = torch.softmax(z, dim=1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


class ExitRuntime:
    """One exit in each execution mode."""

    def __init__(self, index: int, head, spec: ExitSpec, reads: str, writes: str, head_shape):
        self.index, self.head, self.spec = index, head, spec
        self.reads, self.writes, self.head_shape = [reads], writes, head_shape
        crit = spec.criterion
        self.kind = None if crit is None else crit.type
        self.threshold = getattr(crit, "threshold", None)
        self.temperature = getattr(crit, "temperature", 1.0)
        self.patience = getattr(crit, "patience", None)
        self.last = False  # set by the compiler for the graph's final exit
        self.force: float | None = None  # benchmarks: leave with this probability
        self.live_after: set[str] = set()

    @property
    def name(self) -> str:
        return f"exit {self.index}"

    def stays(self, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        """Which rows go on past this exit (bool, one per current row; not for the last exit)."""
        if self.force is not None:  # leave with probability `force`, fixed per sample (benchmarks)
            u = pseudo_uniform(x, self.index)
            return u >= const(self.force, u)
        if self.kind == "patience":
            pred = logits.argmax(dim=1)
            prev = ctx.states.get("exit/pred")
            count = ctx.states.get("exit/count")
            count = (
                torch.zeros_like(pred) if prev is None else torch.where(pred == prev, count + 1, 0)
            )
            ctx.states["exit/pred"], ctx.states["exit/count"] = pred, count
            return count < self.patience
        score = confidence(logits, self.kind, self.temperature)
        thr = const(self.threshold, score)
        return score < thr if self.kind == "max_prob" else score > thr

    def staying(self, ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Infer: positions of the rows that go on, in one fused kernel call (None where the
        kernels do not apply: the caller runs `stays`)."""
        k = ctx.kernels
        if k is None:
            return None
        if self.force is not None:
            return kernels.draw_rows(
                k, x, kernels.DRAW_AT_LEAST, self.force, draw_scale(self.index)
            )
        if self.kind == "patience" or not kernels.applies(logits):
            return None
        return k.rows_where(logits, kernels.KINDS[self.kind], self.threshold, self.temperature)

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
            g.line(f"ctx.leave(z, {self.index}, True)")
            g.line("ctx.rows = 0")
            g.line("return")
            return
        g.line(f"stay = {g.bind(self, f'exit{self.index}')}.split(ctx, z, {x})")
        g.line("n = stay.shape[0]")
        with g.block("if n != ctx.rows:"):
            g.line(f"ctx.leave(z, {self.index}, n == 0)")
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
            ctx.leave(logits, self.index, everyone=True)
            ctx.finish()
            return
        staying = self.staying(ctx, logits, x)
        if staying is not None:
            self._partition(ctx, logits, staying)
        elif ctx.rows == 1:  # one sample: one host sync, no index tensors
            if not bool(self.stays(logits, ctx, x)):
                ctx.leave(logits, self.index, everyone=True)
                ctx.finish()
        else:
            self._partition(ctx, logits, positions(self.stays(logits, ctx, x)))

    def _partition(self, ctx, logits: torch.Tensor, staying: torch.Tensor) -> None:
        """Infer: the rows at `staying` go on, the others leave with `logits`."""
        n = staying.shape[0]
        if n == ctx.rows:  # nobody leaves
            return
        ctx.leave(logits, self.index, everyone=n == 0)
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


@register_construct("exit", ExitSpec, trace_field="exit")
def build_exit(spec: ExitSpec, b, site) -> tuple[ExitRuntime, tuple] | None:
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
    unit = b.unit(f"exit {index} head", head, [site.in_shape], construct=f"exit {index}")
    return ExitRuntime(index, unit, spec, site.in_id, site.node_id, out), site.in_shape


@register_objective("exit")
def exit_objective(lc) -> dict[str, torch.Tensor]:
    """Weighted task loss over every exit (MSDNet); SCAN's self-distillation from the last exit:
    KL at temperature T (scaled by T^2) and an L2 alignment of the exit's layer-normalized input
    features with the last exit's (unnormalized, the alignment diverged: the residual stream's
    scale grew without bound)."""
    exits, logits = lc.model.exits, lc.out.extras["exit_logits"]
    feats = lc.out.extras["exit_features"]
    weights = torch.tensor([e.spec.weight for e in exits])
    task = (
        sum(w * lc.task_loss(z).mean() for w, z in zip(weights.tolist(), logits, strict=True))
        / weights.sum()
    )
    terms = {"task": task}
    last, last_feat = logits[-1].detach(), feats[-1].detach()
    kl = feat = 0.0
    n = max(
        sum(e.spec.distill is not None for e in exits[:-1]), 1
    )  # averaged over exits, as the task loss
    for e, z, f in zip(exits[:-1], logits[:-1], feats[:-1], strict=True):
        d = e.spec.distill
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
