"""`halting` with `carry: true`: Adaptive Computation Time through time (Graves, 2016), and
PonderNet through time.

An RNN cell ponders at every step of a sequence: s_t^1 = S(s_{t-1}, x_t), s_t^n =
S(s_t^{n-1}, x_t), and each (sample, t) halts on its own by ACT's rule; the halting-weighted
mean of its states is s_t, which goes on to t + 1 and is the node's output at t ([L, state]).
The loop at each t is halting.py's own: in infer mode only the rows still pondering at step n
run step n + 1 (compacted), in dense and train mode every row runs and is masked. The ponder
cost is Graves' sequence cost, the sum over t of N_t + R_t.

PonderNet (`rule: pondernet`) ponders the same way: each (sample, t) halts where its
probability of having halted reaches the threshold, and the state of its halting step (the
step PonderNet predicts from) goes on to t + 1, in training too, so that training and
inference carry the same states. Its objective is PonderNet's at every position: the
expected loss under the position's own halting distribution p_t,n, sum over n of p_t,n
L_t(y_t,n), where y_t,n is read from the step-n states of every position through the rest of
the model, plus the KL of p_t to the geometric prior, both averaged over labelled positions.

The trace: `trace.steps` holds each sequence's total ponder steps (what its cost follows) and
`trace.tokens["halting i"]` the steps of each position ([B, L]); a token's MACs are its own
steps' (profiler/tokens.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def check(spec, b, site) -> bool:
    """Whether a `carry: true` node can be built here (a one-line problem if not)."""
    if len(site.in_shape) != 2 or not b.spec.input.is_sequence:
        b.problem(
            site.path + ("carry",),
            f"carry: true ponders over a sequence [L, D]; the input here is {list(site.in_shape)}",
        )
        return False
    if spec.init is not None:
        b.problem(site.path + ("init",), "carry: true starts from zeros; init is not supported")
        return False
    if spec.rule == "pondernet" and b.spec.task.per != "token":
        b.problem(
            site.path + ("carry",),
            "rule pondernet with carry: true needs labels per token (its loss weighs each "
            "position's steps by that position's halting distribution)",
        )
        return False
    return True


@dataclass(eq=False)
class CarryRuntime:
    """A halting node run at every step of a sequence, its state carried (the ACT rule)."""

    inner: Any  # the HaltingRuntime of one time step
    length: int  # the longest sequence
    live_after: set[str] = field(default_factory=set)
    per = "token"

    def __getattr__(self, name: str) -> Any:
        # (not its step's stream parts: a loop through time runs whole in a stream)
        if name.startswith("__") or name in ("inner", "stream_parts"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    # what calibration and settings change reaches the loop of each step
    @property
    def epsilon(self) -> float:
        return self.inner.epsilon

    @epsilon.setter
    def epsilon(self, v: float) -> None:
        self.inner.epsilon = v

    @property
    def threshold(self) -> float | None:
        return self.inner.threshold

    @threshold.setter
    def threshold(self, v: float | None) -> None:
        self.inner.threshold = v

    @property
    def max_steps(self) -> int:
        """Steps at most over a whole sequence (the longest path's count)."""
        return self.inner.max_steps * self.length

    @property
    def name(self) -> str:
        return self.inner.name

    def apply(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """The node's output [rows, L, state] for the current rows (every mode)."""
        inner, n = self.inner, x.shape[1]
        h, outs, steps, extras = None, [], [], []
        for t in range(n):
            xt = x[:, t]
            h = inner.infer(ctx, xt, h) if ctx.compacting else inner._all_steps(ctx, xt, h)
            outs.append(h)
            v = ctx.decisions[-1][4]  # the steps of this t, as the loop recorded them
            steps.append(
                v if torch.is_tensor(v) else torch.full_like(xt[:, 0], v, dtype=torch.long)
            )
            if ctx.mode == "train":
                extras.append(ctx.extras["halting"].pop())
        per_token = torch.stack(steps, 1)
        ctx.record("steps", inner.index, per_token.sum(1))
        for unit in (*inner.steps, inner.unit):  # each ran steps_t times at position t
            ctx.record_tokens(unit.index, inner.name, per_token)
        if extras:
            ctx.extras["halting"].append(self._extras(extras, per_token, outs))
        return torch.stack(outs, 1)

    def _extras(self, extras: list[dict], per_token: torch.Tensor, outs: list) -> dict:
        """What the objective reads of a train pass, from each position's loop: ACT's
        sequence ponder cost; PonderNet's states and halting probabilities of every step, as
        [B, L, ...] per step (every position runs every step in training)."""
        out = {"rule": self.inner.rule, "steps": per_token,
               "remainder": torch.stack([e["remainder"] for e in extras], 1),
               "ponder": torch.stack([e["ponder"] for e in extras], 1).sum(1)}  # fmt: skip
        if self.inner.rule == "pondernet":
            steps = range(len(extras[0]["states"]))
            out["states"] = [torch.stack([e["states"][n] for e in extras], 1) for n in steps]
            out["probs"] = [torch.stack([e["probs"][n] for e in extras], 1) for n in steps]
        else:
            out["states"] = [torch.stack(outs, 1)]
            out["probs"] = [torch.stack([e["probs"][0] for e in extras], 1)]  # first steps
        return out

    def run(self, ctx) -> None:
        ctx.env[self.writes] = self.apply(ctx, ctx.env[self.reads[0]])

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it): the step's loop, at
        every position."""
        return {**self.inner.export_step(), "kind": "halting_time"}

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `apply` on its input."""
        x = g.var(self.reads[0])
        g.assign(self.writes, f"{g.bind(self, f'halting{self.index}')}.apply(ctx, {x})")
