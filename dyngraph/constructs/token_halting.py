"""`halting` with `per: token`: halting over depth per position (Universal Transformer,
Dehghani et al., 2019, with Graves' ACT).

One step (a sequence block that keeps [L, D]: a transformer layer, shared across steps) is
applied again and again to the sequence; each position halts on its own. From s_0 = x, a
position still running at step n gets s_n = T(s_{n-1}) and a halting probability p_n =
h(s_n); it halts at the first n where sum p >= 1 - epsilon (or at `max_steps`), and its
output is the halting-weighted mean of its states (the last weight the remainder R). A
halted position keeps its state: later steps read it as a key and a value and compute
nothing else for it (runtime/token_rows.py's partial queries), and a sequence whose positions
have all halted leaves the loop. Dense and train mode run every position at every step and
keep the halted ones' states (a masked update), so that they give infer's outputs; the ponder
cost is N + R per position, averaged (halting_objective.py).

Trace: `trace.steps` each sequence's total steps over its positions; `trace.tokens["halting
i"]` the steps of each position (part of the path: which positions run a step sets its cost);
`trace.tokens["halting i step n"]` 1 where the position ran step n, 0 where it was halted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime.context import const, positions, pseudo_uniform
from ..runtime.token_rows import grid_of
from .api import Site


class StepAndHalt(nn.Module):
    """One unit: the step T and the halting unit h on its output, per token. `forward_rows`
    runs both for some positions only, every position a key and a value."""

    def __init__(self, step: nn.Module, halt: nn.Module):
        super().__init__()
        self.step, self.halt = step, halt
        self.dim = getattr(step, "dim", None)

    def _p(self, s: torch.Tensor) -> torch.Tensor:
        return self.halt(s.reshape(-1, s.shape[-1])).view(s.shape[:-1])

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = self.step(s)
        return new, self._p(new)

    def forward_rows(self, s: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        new = self.step.forward_rows(s, grid)
        return new, self._p(new)


@dataclass(eq=False)
class TokenHaltingRuntime:
    """One halting node over depth, per position (the ACT rule)."""

    index: int
    unit: Any  # StepAndHalt's unit: [b, L, D] -> ([b, L, D], p [b, L])
    max_steps: int
    epsilon: float
    ponder_cost: float
    reads: list[str]
    writes: str
    rule = "act"
    per = "token"
    threshold: float | None = None  # (the halting construct's settings: ACT has epsilon)
    live_after: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"halting {self.index}"

    @property
    def token_decision(self) -> str:  # its trace.tokens record, part of the path
        return self.name

    @property
    def steps(self) -> list[Any]:  # (what halting.py's `longest` reads)
        return [self.unit]

    def halts(self, ctx, t: int, cum: torch.Tensor, p: torch.Tensor, s: torch.Tensor):
        """Which positions halt after step t: `cum` [N] their halting sums before it, `p` [N]
        this step's probabilities, `s` [N, D] their new states (forcing draws from them)."""
        return cum + p >= const(1 - self.epsilon, p)

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        ctx.env[self.writes] = self.infer(ctx, x) if ctx.compacting else self._dense(ctx, x)

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner/tokens.py runs it)."""
        return {"kind": "token_halting", "index": self.index, "unit": self.unit.index,
                "max_steps": self.max_steps, "epsilon": self.epsilon,
                "reads": list(self.reads), "writes": self.writes}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `infer` on the local it reads."""
        x = g.var(self.reads[0])
        g.assign(self.writes, f"{g.bind(self, f'halting{self.index}')}.infer(ctx, {x})")

    def _log(self, ctx, t: int, running: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Step t's record over the context's rows: 1 running, 0 halted, -1 out of the loop."""
        if pos is not None:
            full = torch.full((ctx.rows, running.shape[1]), -1, dtype=torch.long,
                              device=running.device)  # fmt: skip
            running = full.index_copy_(0, pos, running.long())
        ctx.record_tokens(self.unit.index, f"{self.name} step {t}", running, "queries")

    def infer(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """Infer: only running positions compute (queries, MLP, halting unit); sequences
        whose positions have all halted leave the loop, their outputs written once."""
        b, n, d = x.shape
        out, all_steps = torch.empty_like(x), torch.empty(b, n, dtype=torch.long, device=x.device)
        steps = torch.zeros(b, n, dtype=torch.long, device=x.device)
        s = x.clone()
        acc, cum = torch.zeros_like(x), x.new_zeros(b, n)
        running = torch.ones(b, n, dtype=torch.bool, device=x.device)
        pos = None  # positions among the context's rows of the sequences in the loop
        last = self.max_steps - 1
        for t in range(self.max_steps):
            self._log(ctx, t, running, pos)
            ctx.events.append((self.unit.index, ctx.idx, pos))  # (ctx.call's log)
            bn = s.shape[0] * n
            flat = running.reshape(-1).nonzero().flatten()
            if flat.shape[0] == bn:
                new, p = self.unit(s)
                new, p = new.reshape(bn, d), p.reshape(bn)
            else:
                grid = grid_of(running)
                new, p = self.unit.module.forward_rows(s, grid)
                ctx.query_padding.append((self.unit.module.step, running, grid.padded))
            c = cum.reshape(-1).index_select(0, flat)
            halt = (
                torch.ones_like(p, dtype=torch.bool) if t == last else self.halts(ctx, t, c, p, new)
            )
            w = torch.where(halt, 1 - c, p)
            acc.view(bn, d).index_add_(0, flat, new * w.unsqueeze(1))
            ctx.put(s.view(bn, d), flat, new)  # (one memcpy per row)
            cum.view(-1).index_copy_(0, flat, c + p)
            steps.view(-1).index_add_(0, flat, torch.ones_like(flat))
            running = running.reshape(-1).index_fill(0, flat[halt], False).view_as(running)
            done = ~running.any(1)
            if not bool(done.any()):
                continue
            gone = positions(done)
            rows = gone if pos is None else pos.index_select(0, gone)
            out.index_copy_(0, rows, acc.index_select(0, gone))
            all_steps.index_copy_(0, rows, steps.index_select(0, gone))
            keep = positions(~done)
            if keep.shape[0] == 0:
                break
            pos = keep if pos is None else pos.index_select(0, keep)
            s, acc, cum, running, steps = s[keep], acc[keep], cum[keep], running[keep], steps[keep]
        ctx.record("steps", self.index, all_steps.sum(1))
        ctx.record_tokens(None, self.name, all_steps, "decision")
        return out

    def _dense(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """Dense/train: every position at every step; the halted ones keep their states."""
        b, n, _ = x.shape
        s, acc, cum = x, torch.zeros_like(x), x.new_zeros(b, n)
        running = torch.ones(b, n, dtype=torch.bool, device=x.device)
        steps, remainder = torch.zeros(b, n, dtype=torch.long, device=x.device), x.new_zeros(b, n)
        states, probs = [], []
        for t in range(self.max_steps):
            live = ctx.live & running.any(1)
            self._log_dense(ctx, t, running, live)
            ctx.events.append((self.unit.index, live, None))
            new, p = self.unit(s)
            states.append(new)
            probs.append(p)
            halt = running if t == self.max_steps - 1 else running & self.halts(
                ctx, t, cum.reshape(-1), p.reshape(-1), new.reshape(b * n, -1)).view(b, n)  # fmt: skip
            w = torch.where(halt, 1 - cum, p) * running
            acc = acc + w.unsqueeze(-1) * new
            remainder = torch.where(halt, 1 - cum, remainder)
            s = torch.where(running.unsqueeze(-1), new, s)
            cum = torch.where(running, cum + p, cum)
            steps = steps + running.long()
            running = running & ~halt
            # (train mode runs every step: a batch's length groups then return as many)
            if ctx.mode != "train" and not bool(running.any()):
                break
        ctx.record("steps", self.index, steps.sum(1))
        ctx.record_tokens(None, self.name, steps, "decision")
        if ctx.mode == "train":
            ctx.extras["halting"].append({"rule": "act", "states": states, "probs": probs,
                                          "steps": steps, "remainder": remainder,
                                          "ponder": steps.to(x.dtype) + remainder})  # fmt: skip
        return acc

    def _log_dense(self, ctx, t: int, running: torch.Tensor, live: torch.Tensor) -> None:
        v = torch.where(live.unsqueeze(1), running.long(), -1)
        ctx.record_tokens(self.unit.index, f"{self.name} step {t}", v, "queries")


def force(h: TokenHaltingRuntime, steps: tuple[int, int]) -> dict:
    """Benchmarks and tests (dyngraph.forcing): each position runs a number of steps drawn in
    [lo, hi] from its state after the first step."""
    lo, hi = steps

    def halts(ctx, t, cum, p, s):
        draw = lo + (pseudo_uniform(s, 300 + h.index) * (hi - lo + 1)).long()
        return draw <= const(t + 1, draw)

    return {"halts": halts}


def build(spec, b, site: Site, index: int):
    """Check and build one `per: token` halting node (halting.py's builder hands it over)."""
    from ..blocks.registry import acts_per_token
    from ..core.types import InlineModule

    path, shape = site.path, site.in_shape
    if len(shape) != 2 or not b.spec.input.is_sequence:
        b.problem(path + ("per",), f"per: token needs a sequence [L, D] here, got {list(shape)}")
        return None
    for key in ("init", "carry", "step_flag"):
        if getattr(spec, key, None):
            b.problem(path + (key,), f"{key} is not supported with per: token (UT halting)")
            return None
    if not spec.shared:
        b.problem(path + ("shared",), "per: token shares one step across depth (UT)")
        return None
    step = b.module(spec.step, path + ("step",), [shape])
    if step is None:
        return None
    out = b.shapes_of(step, [shape], path + ("step",), "the step")
    if out is not None and out != shape:
        b.problem(path + ("step",), f"shape mismatch: the step maps {list(shape)} to {list(out)}")
        return None
    if out is None:
        return None
    if not (acts_per_token(step) or hasattr(step, "forward_rows")):
        b.problem(
            path + ("step",),
            "per: token halting needs a step with partial queries (attention, "
            "transformer_block) or one that acts per token",
        )
        return None
    unit_ref = spec.unit or InlineModule(type="act_unit")
    halt = b.module(unit_ref, path + ("unit",), [(shape[-1],)], ("halting_unit",))
    if halt is None:
        return None
    name = f"halting {index}"
    module = StepAndHalt(step, halt)
    unit = b.unit(f"{name} step", module, [shape], "segment", name)
    unit.rows = module if hasattr(step, "forward_rows") else None
    rt = TokenHaltingRuntime(index, unit, spec.max_steps, spec.epsilon, spec.ponder_cost,
                             [site.in_id], site.node_id)  # fmt: skip
    return rt, shape
