"""`exit` with `per: token`: each token of a sequence leaves on its own (CALM, Schuster et
al., 2022; LayerSkip, Elhoushi et al., 2024).

A per-token head (a `token_classifier`) reads the node's input for the tokens still running;
each one that meets the criterion (max_prob, entropy; or `learned`: a stop unit on the token's
state, CALM's early-exit classifier, trained by exit.py's `stop_loss`) leaves with the head's
prediction, and its state is frozen: the layers after the exit (runtime/token_rows.py) read it
as a key and a value and compute nothing else for it. The last exit takes every token left. A
sequence whose tokens have all left leaves the batch, so nothing of it runs afterwards.

Training follows CALM and LayerSkip: every token runs every layer and every exit's per-token
loss is weighted and summed (exit.py's objective, with SCAN-style distillation per token).
Dense mode equals infer by a masked update (every token computed, frozen ones kept).

Trace: `trace.exit` [B] the last exit a sequence's tokens left at; `trace.tokens["exit"]`
[B, L] each token's exit (part of the path: which positions run a later layer sets its cost
under causal attention, not only how many); `trace.tokens["<layer> tokens"]` 1 where a token
ran the layer, 0 where it was frozen; `trace.tokens["exit k head tokens"]` (and, criterion
`learned`, `"exit k stop tokens"`) 1 where a token reached exit k, so its head (its stop unit)
read it. A token's MACs: runtime/lengths.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.types import InlineModule
from ..runtime import kernels
from ..runtime.context import positions
from ..runtime.token_rows import TokenRows
from .api import Site
from .exit_criteria import RULES


@dataclass(eq=False)
class TokenExitRuntime:
    """One per-token exit in each execution mode (ExitRuntime's fields, decided per token)."""

    index: int
    head: Any  # a unit acting per token: [b, L, D] -> [b, L, C]
    kind: str | None
    threshold: float | None
    temperature: float
    patience: int | None
    weight: float
    distill: Any
    reads: list[str]
    writes: str
    head_shape: tuple
    last: bool = False
    live_after: set[str] = field(default_factory=set)
    stop: Any = None  # criterion `learned`: the stop unit, per token [b, L, D] -> [b, L, 1]
    per = "token"
    freezes_tokens = True  # the layers after it update running tokens only (compiler)
    token_decision = "exit"  # its trace.tokens record, part of the path

    def __post_init__(self) -> None:
        self.rule = RULES.get(self.kind)

    @property
    def name(self) -> str:
        return f"exit {self.index}"

    def stays(self, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        """Which tokens go on ([N] bool): `logits` [N, C] and states `x` [N, D] of the running
        tokens (forcing draws from the states)."""
        return self.rule.stays(self, logits, ctx, x)

    def stop_logits(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """Criterion `learned`: the stop unit's logits [N] for the running tokens' states `x`
        [N, D] (every token's in dense and train mode), logged as the head is (it reads the
        same tokens); dense and train mode keep them for the stop's loss (exit.py)."""
        t = ctx.token_rows
        ctx.record_tokens(self.stop.index, f"{self.name} stop tokens", t.active)
        s = ctx.call(self.stop, x.view(1, -1, x.shape[-1])).view(-1)
        if not ctx.compacting:  # (x is detached there: the loss trains the stop unit alone)
            ctx.extras["exit_stop"].append(
                (len(ctx.extras["exit_logits"]) - 1, s.view(t.active.shape))
            )
        return s.detach() if not ctx.compacting else s

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        if not ctx.compacting:
            t = ctx.token_rows
            if t is None:
                t = ctx.token_rows = TokenRows.start(x)
            ctx.record_tokens(self.head.index, f"{self.name} head tokens", t.active)
            self._dense(ctx, x, t)
            return
        stay, out = self.decide(ctx, x)
        if stay is not None:
            ctx.part(stay, out, self.index, self.live_after)

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner/tokens.py runs it)."""
        return {"kind": "token_exit", "index": self.index, "head": self.head.index,
                "criterion": self.kind, "threshold": self.threshold,
                "temperature": self.temperature, "reads": list(self.reads),
                "live_after": sorted(self.live_after), "last": self.last,
                "stop": None if self.stop is None else self.stop.index}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py), as `run`: `decide`, then `ctx.part`'s work."""
        x = g.var(self.reads[0])
        g.line(f"stay, z = {g.bind(self, f'exit{self.index}')}.decide(ctx, {x})")
        with g.block("if stay is not None:"):
            g.line("n = stay.shape[0]")
            g.line(f"ctx.leave(z, {self.index}, n == 0)")
            with g.block("if n == 0:"):
                g.line("ctx.rows = 0")
                g.line("return")
            live = g.live(self.live_after)
            g.line(f"{g.values(live)}= ctx.compact(stay, [{g.values(live)}])")

    def decide(self, ctx, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Infer: the head on the running tokens, and the tokens meeting the criterion leave.
        Returns (None, None) while every sequence keeps a running token; else the positions
        of the sequences that go on (empty: none) and every current sequence's outputs."""
        t = ctx.token_rows
        b, n, d = x.shape
        if t is None:
            t = ctx.token_rows = TokenRows.start(x)
        ctx.record_tokens(self.head.index, f"{self.name} head tokens", t.active)
        if t.everyone:
            xs = x.reshape(b * n, d)
            z = ctx.call(self.head, x).reshape(b * n, -1)
        else:
            ctx.events.append((self.head.index, ctx.idx, None))  # (ctx.call's log)
            xs = t.rows_of(x)
            z = self.head(xs.view(1, -1, d)).view(xs.shape[0], -1)
        if t.out is None:  # (the head's dtype)
            t.out = z.new_zeros((b, n, z.shape[1]))
        if ctx.kernels is not None and z.is_contiguous():
            return self._decide_fused(ctx, t, z, xs)
        go = None  # positions among the running tokens of those leaving (None: all)
        if not self.last:
            go = positions(~self.stays(z, ctx, xs))
            if go.shape[0] == 0:  # nobody leaves here
                ctx.record_tokens(None, "exit", t.exit_at, "decision")
                return None, None
            if go.shape[0] == z.shape[0]:
                go = None
        rows = t.flat if go is None else t.flat.index_select(0, go)
        ctx.put(t.out.view(b * n, -1), rows, z, go)  # (one memcpy per row)
        t.stop(rows, self.index)
        ctx.record_tokens(None, "exit", t.exit_at, "decision")
        out = t.out
        if go is None:  # (the last exit, or every token left here)
            return rows.new_zeros(0), out
        stay = positions(t.active.any(1))
        if stay.shape[0] == b:
            return None, None
        t.keep(stay)  # some sequences have no token left: they leave the batch
        return stay, out

    def stay_rule(self, ctx, z: torch.Tensor, xs: torch.Tensor) -> tuple:
        """The tokens that stay, as the fused kernel reads them: (tensor, rule, threshold, a),
        the criterion's own kernel rule on the logits `z` where it has one, else the bool
        answer of its `stays` (kernels.TRUE); the last exit keeps none."""
        if self.last:
            return z, kernels.NEVER, 0.0, 0.0
        if self.rule.kernel is not None and kernels.applies(z):
            return z, self.rule.kernel, self.threshold, self.temperature
        return self.stays(z, ctx, xs), kernels.TRUE, 0.0, 0.0

    def _decide_fused(self, ctx, t: TokenRows, z: torch.Tensor, xs: torch.Tensor) -> tuple:
        """`decide` after the head, on a CPU in infer mode: the criterion, the leaving tokens'
        outputs and marks, and the sequences left with a running token, in one kernel call
        (kernels.cpp `token_exit`; ~8 ATen ops otherwise)."""
        b = t.active.shape[0]
        go, active, exit_at, alive = ctx.kernels.token_exit(
            *self.stay_rule(ctx, z, xs), None if t.everyone else t.flat, t.active, t.exit_at,
            t.out.view(t.active.numel(), -1), z, self.index,
        )  # fmt: skip
        if go.shape[0]:
            t.marked(active, exit_at)
        ctx.record_tokens(None, "exit", t.exit_at, "decision")
        if go.shape[0] == 0 or alive.shape[0] == b:
            return None, None
        out = t.out  # (every current sequence's: `keep` compacts t.out)
        if alive.shape[0]:
            t.keep(alive)  # some sequences have no token left: they leave the batch
        return alive, out

    def _dense(self, ctx, x: torch.Tensor, t: TokenRows) -> None:
        """Dense/train: every token's head; the running tokens that would leave here take its
        logits (dense mode freezes them; train mode runs every token on)."""
        b, n, d = x.shape
        z = ctx.call(self.head, x)
        ctx.extras["exit_logits"].append(z)
        ctx.extras["exit_features"].append(x)
        leave = t.active
        if not self.last:
            zs = z.detach().reshape(b * n, -1)
            leave = leave & ~self.stays(zs, ctx, x.detach().reshape(b * n, d)).view(b, n)
        t.out = torch.where(leave.unsqueeze(-1), z, z.new_zeros(()) if t.out is None else t.out)
        t.exit_at = torch.where(leave, self.index, t.exit_at)
        t.active = t.active & ~leave
        t.everyone = False
        ctx.record_tokens(None, "exit", t.exit_at, "decision")
        done = ctx.live & ~t.active.any(1)
        ctx.record(ctx.out_column, None, self.index, where=done)
        ctx.live = ctx.live & ~done
        ctx.out = t.out


def exit_head(spec, b, site: Site) -> tuple | None:
    """An exit's head module and its output shape (None after a problem); exit.py's too."""
    head = b.module(spec.head, site.path + ("head",), [site.in_shape])
    if head is None:
        return None
    out = b.shapes_of(head, [site.in_shape], site.path + ("head",), "the exit head")
    return None if out is None else (head, out)


def build_token_exit(spec, b, site: Site, index: int, crit: dict):
    """Check and build one `per: token` exit node (exit.py's builder hands it over)."""
    task, name = b.spec.task, f"exit {index}"
    if len(site.in_shape) != 2 or not b.spec.input.is_sequence:
        b.problem(
            site.path + ("per",),
            f"per: token needs a sequence [L, D] here, got {list(site.in_shape)}",
        )
        return None
    if task.per != "token":
        b.problem(
            site.path + ("per",),
            "a per: token exit needs a per-token task (`task: {per: token}` or a language model)",
        )
        return None
    if spec.criterion is not None and spec.criterion.type == "patience":
        b.problem(
            site.path + ("criterion",),
            "criterion 'patience' counts exits per sample; per token use max_prob, entropy "
            "or learned",
        )
        return None
    got = exit_head(spec, b, site)
    if got is None:
        return None
    head, out = got
    want = (site.in_shape[0], task.classes) if task.classifies else out
    if out != want:
        b.problem(
            site.path + ("head",),
            f"shape mismatch: the head outputs {list(out)}; the task needs {list(want)} "
            "(a label per position)",
        )
        return None
    unit = b.unit(f"{name} head", head, [site.in_shape], construct=name, head=True)
    if not unit.per_token:
        b.problem(
            site.path + ("head",),
            "a per: token exit's head must compute each token alone (e.g. token_classifier)",
        )
        return None
    stop = None
    if spec.criterion is not None and spec.criterion.type == "learned":
        if not task.classifies:
            b.problem(site.path + ("criterion",), "criterion 'learned' learns when a token's "
                      "prediction is right: it needs a classification task")  # fmt: skip
            return None
        ref = spec.criterion.unit or InlineModule(type="token_classifier", classes=1)
        path = site.path + ("criterion", "unit")
        m = b.module(ref, path, [site.in_shape])
        shape = None if m is None else b.shapes_of(m, [site.in_shape], path, "the stop unit")
        if shape is None:
            return None
        if shape != (site.in_shape[0], 1):
            b.problem(path, f"the stop unit outputs {list(shape)}; it must give [L, 1] (one "
                      "logit per token)")  # fmt: skip
            return None
        stop = b.unit(f"{name} stop", m, [site.in_shape], construct=name)
        if not stop.per_token:
            b.problem(path, "the stop unit must compute each token alone (e.g. token_classifier)")
            return None
    rt = TokenExitRuntime(index, unit, None if spec.criterion is None else spec.criterion.type,
                          **crit, weight=spec.weight, distill=spec.distill, reads=[site.in_id],
                          writes=site.node_id, head_shape=out, stop=stop)  # fmt: skip
    return rt, site.in_shape
