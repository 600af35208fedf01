"""`gate` with `per: token`: Mixture-of-Depths routing (Raposo et al., 2024).

A `token_router` gives every token of a sequence a probability p of running the body. Either
the top `capacity` x L tokens of each sequence are routed (k = ceil(c·L), a static shape: the
paper's choice) or, without `capacity`, every token with p >= `threshold`. The body runs on the
routed tokens only, **as a shorter sequence** in their original order: attention reads only
routed tokens, and a causal body's mask follows the original positions because the order is
kept. A routed token's output is x + p·(body(x) - x), the body's residual update scaled by the
router's weight, so that the router learns by backpropagation; an unrouted token passes
through unchanged. The same computation runs in every mode (train, dense, infer): each
sequence's k tokens are gathered, so no padded or unrouted token executes anything.

Top-k over a sequence reads its future tokens, so it cannot decide while decoding. MoD's
answer is a small causal predictor trained beside the router (on detached inputs, binary
cross-entropy against the top-k decisions): give the gate `predictor: {type: token_router}`,
and `model.set_decode(True)` routes by the predictor's p >= 0.5 instead of the top-k.

Sequences whose routed counts differ (threshold or predictor routing) run in groups of one
count, each group as its own batch, so a sequence's result and cost are those it has alone; a
body that computes each token alone (no attention: `unit.per_token`) runs every routed token
in one call instead.
Its MACs are exact: the body's cost at its own routed length (runtime/lengths.py's per-length
costs), recorded per token in `trace.tokens[name]` ([B, L]: 1 routed, 0 not, -1 padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime import kernels
from ..runtime.context import positions
from .api import Site


@dataclass(eq=False)
class TokenGateRuntime:
    """One Mixture-of-Depths gate in each execution mode."""

    index: int
    threshold: float
    capacity: float | None
    body: Any  # the body's unit: a sequence block that keeps the shape [L, D]
    policy: Any  # the token_router's unit: [b, L, D] -> p [b, L]
    predictor: Any | None  # a causal token_router's unit (decoding), or None
    reads: list[str]
    writes: str
    decode: bool = False  # route by the predictor (p >= 0.5), not by the top-k
    route_all: bool = False  # every token runs the body (while its costs are counted)
    live_after: set[str] = field(default_factory=set)
    # what the sample gates' stage hooks set (a token gate's compute is fixed by its routing)
    train_mode: str = "soft"
    forced_on: bool = False
    mode_override: str | None = None
    per = "token"

    @property
    def name(self) -> str:
        return f"gate {self.index}"

    def routed(self, ctx, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """([b, L] bool: the tokens that run the body; with a capacity the [b, k] positions
        of those tokens in order, else None; in infer mode on a CPU with a capacity, their
        (flat rows, weights) from the fused kernel, else None)."""
        n = x.shape[1]
        if self.route_all:
            return torch.ones_like(p, dtype=torch.bool), None, None
        if self.predictor is not None and (self.decode or ctx.mode == "train"):
            q = ctx.call(self.predictor, x.detach())
        if self.decode and self.predictor is not None:
            return q >= 0.5, None, None
        idx = None
        if self.capacity is None:
            route = p >= self.threshold
        else:
            k = min(n, math.ceil(self.capacity * n - 1e-9))
            if ctx.kernels is not None and kernels.applies(p) and 0 < k:  # (~12 ATen ops)
                idx, route, flat, w = ctx.kernels.top_tokens(p, k)
                return route, idx, (flat, w)
            idx = top_positions(p.detach(), k)
            route = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
        if self.predictor is not None and ctx.mode == "train":
            ctx.extras["token_predictors"].append({"prob": q, "target": route.float()})
        return route, idx, None

    def _through(self, ctx, x, p, groups: list, out, w=None) -> torch.Tensor:
        """Each group's tokens (`token_groups`) of `x` through the body, scaled by their
        weight in `p` (one group: `w`, its weights, if given), written into their rows of `out`
        (in place in infer mode; else a new tensor)."""
        b, n, d = x.shape
        for rows, flat, k in groups:
            xk = x.reshape(b * n, d).index_select(0, flat)
            y = ctx.call(self.body, xk.view(-1, k, d) if k else xk.view(1, -1, d), count=rows)
            wk = p.reshape(-1).index_select(0, flat).unsqueeze(1) if w is None else w
            new = torch.lerp(xk, y.reshape(-1, d), wk)  # xk + p·(y - xk)
            if ctx.compacting:  # (one memcpy per row)
                ctx.put(out.view(b * n, d), flat, new)
            else:
                out = out.reshape(b * n, d).index_copy(0, flat, new).view(b, n, d)
        return out

    def apply(self, ctx, x: torch.Tensor, live: list | None = None) -> torch.Tensor:
        """The node's output for the current rows (every mode). Infer: written into `x`
        itself where nothing reads it again (`live`: the values read after this node; None
        when `x` is one of them)."""
        p = ctx.call(self.policy, x)
        route, idx, fused = self.routed(ctx, x, p)
        ctx.record_tokens(self.body.index, self.name, route)
        if self.capacity is not None and not self.decode or self.route_all:
            ctx.record("gates", self.index, route.shape[1] if idx is None else idx.shape[1])
        counts = None if idx is not None or self.route_all else route.sum(1)
        if counts is not None:
            ctx.record("gates", self.index, counts)
        if ctx.mode == "train" and self.capacity is None:  # what a compute penalty weighs
            m = p.mean(1)
            ctx.extras["gates"].append(
                {"prob": m, "action": route.float().mean(1), "logp": torch.zeros_like(m),
                 "gate": m, "forced": False, "mode": "token"}
            )  # fmt: skip
        owned = ctx.compacting and live is not None and ctx.free(x, live)
        out = x if owned or not ctx.compacting else x.clone()
        if fused is not None:  # (the kernel's flat rows and weights)
            return self._through(ctx, x, p, [(None, fused[0], idx.shape[1])], out, fused[1])
        if counts is None:  # every sequence routes the same number of tokens
            b, n = route.shape
            if idx is None:
                idx = torch.arange(n, device=x.device).expand(b, -1)
            flat = (idx + torch.arange(b, device=x.device).unsqueeze(1) * n).view(-1)
            return self._through(ctx, x, p, [(None, flat, idx.shape[1])], out)
        return self._through(ctx, x, p, token_groups(route, self.body.per_token), out)

    def run(self, ctx) -> None:
        env, key = ctx.env, self.reads[0]
        live = None if key in self.live_after else [env[k] for k in self.live_after if k in env]
        env[self.writes] = self.apply(ctx, env[key], live)

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it), decoding or not."""
        return {"kind": "token_gate", "index": self.index, "policy": self.policy.index,
                "body": self.body.index, "capacity": self.capacity,
                "threshold": self.threshold, "per_token": bool(self.body.per_token),
                "predictor": None if self.predictor is None else self.predictor.index,
                "decode": self.decode, "reads": list(self.reads),
                "writes": self.writes}  # fmt: skip

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): one call of `apply` on its input."""
        x, key = g.var(self.reads[0]), self.reads[0]
        live = "None" if key in self.live_after else f"[{g.values(g.live(self.live_after))}]"
        g.assign(self.writes, f"{g.bind(self, f'gate{self.index}')}.apply(ctx, {x}, {live})")


def top_positions(p: torch.Tensor, k: int) -> torch.Tensor:
    """Each sequence's top `k` tokens by router probability `p` [b, L], as their positions in
    order [b, k]. Ties go to the earlier position (a stable sort; NaN ranks first), so that
    every path routes the same tokens: the fused kernel (kernels.cpp `top_tokens`) and the
    exported runner (runtime/runner/steps.py) take this order too, where `topk` leaves the
    order of ties to its implementation."""
    return p.sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


def token_groups(mask: torch.Tensor, per_token: bool) -> list[tuple]:
    """How the tokens `mask` [b, L] of a batch run a unit: (rows, flat, k) per call, `rows`
    the samples taking part (positions), `flat` their tokens' rows of [b·L, D] in order (moved
    by index_select / index_copy_, 6-15x faster on CPU than gather / scatter_ with an index
    expanded over D), `k` the tokens per sample. A unit that computes each token alone
    (`per_token`) takes every sequence's tokens in one call (k None: one [1, N, D] sequence);
    otherwise sequences run in groups of one count, so each gets the result it has alone."""
    b, n = mask.shape
    counts = mask.sum(1)
    if per_token:
        return [(positions(counts > 0), mask.reshape(-1).nonzero().flatten(), None)]
    groups = []
    for k in sorted(set(counts.tolist()) - {0}):
        rows = positions(counts == k)
        idx = mask.index_select(0, rows).nonzero()[:, 1].view(-1, k)
        groups.append((rows, (idx + rows.unsqueeze(1) * n).view(-1), k))
    return groups


def build_token_gate(spec, b, site: Site, index: int) -> tuple[TokenGateRuntime, tuple] | None:
    """Check and build one `per: token` gate node (gate.py's builder hands it over)."""
    name = f"gate {index}"
    if len(site.in_shape) != 2 or not b.spec.input.is_sequence:
        b.problem(
            site.path + ("per",),
            f"per: token needs a sequence [L, D] here, got {list(site.in_shape)}",
        )
        return None
    units = []
    for key, ref in (("policy", spec.policy), ("predictor", spec.predictor)):
        if ref is None:
            units.append(None)
            continue
        got = b.controller(ref, site.path + (key,), site.in_shape, ("gate_policy",))
        if got is None:
            return None
        if getattr(got[0], "style", None) != "token":
            b.problem(site.path + (key,), "a per: token gate's policy is a token_router")
            return None
        units.append(b.unit(f"{name} {key}", got[0], [site.in_shape], construct=name))
    body = shape_keeping_body(spec, b, site, name, "unrouted tokens pass through")
    if body is None:
        return None
    rt = TokenGateRuntime(
        index, spec.threshold, spec.capacity, body, units[0], units[1], [site.in_id], site.node_id
    )
    return rt, site.in_shape


def shape_keeping_body(spec, b, site: Site, name: str, why: str) -> Any:
    """A gate's body unit, or None after a problem: it must keep its input's shape (`why`)."""
    body, out = b.program(spec.body, site.path + ("body",), site.in_shape, f"{name} body", name)
    if body is not None and out != site.in_shape:
        b.problem(
            site.path + ("body",),
            f"shape mismatch: a gated body must keep its input's shape ({why}): in "
            f"{list(site.in_shape)}, out {list(out)}",
        )
        return None
    return body


def predictor_loss(lc) -> dict[str, torch.Tensor]:
    """MoD's causal predictor: binary cross-entropy against the top-k routing, per token."""
    preds = lc.out.extras.get("token_predictors")
    if not preds:
        return {}
    loss = torch.stack(
        [F.binary_cross_entropy(d["prob"].clamp(1e-6, 1 - 1e-6), d["target"]) for d in preds]
    )
    return {"router_predictor": loss.mean()}


def save_settings(gates: list) -> list:
    """What a checkpoint keeps of each gate: its threshold (and a token gate's capacity)."""
    return [
        g.threshold
        if getattr(g, "per", "sample") == "sample"
        else {"threshold": g.threshold, "capacity": g.capacity}
        for g in gates
    ]


def load_settings(gates: list, value: list) -> None:
    for g, v in zip(gates, value, strict=False):
        if isinstance(v, dict):
            g.threshold, g.capacity = v["threshold"], v.get("capacity", g.capacity)
        else:
            g.threshold = v


#: capacities a calibration sweep tries (MoD gates of fixed capacity)
CAPACITIES = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def capacity_gates(gates: list) -> list:
    """The gates whose compute a capacity sets (per-token gates with `capacity`)."""
    return [g for g in gates if getattr(g, "capacity", None) is not None]


def set_decode(gates: list, on: bool = True) -> None:
    """`model.set_decode(True)`: Mixture-of-Depths gates with a predictor route by it (causal:
    a token's decision reads no later token) instead of the top-k; False: the top-k again."""
    with_predictor = [g for g in gates if getattr(g, "predictor", None) is not None]
    if on and not with_predictor:
        raise ValueError("set_decode: no per-token gate of this model has a predictor")
    for g in with_predictor:
        g.decode = bool(on)


def longest(g, counts: torch.Tensor, macs: torch.Tensor) -> None:
    """The longest path runs every unit once, but a predictor only while decoding."""
    predictor = getattr(g, "predictor", None)
    if predictor is not None and not g.decode:
        counts[predictor.index] = 0
