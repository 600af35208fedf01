"""A halting node in a stream (runtime/stream.py): continuous batching of its loop.

The node runs as two parts: entry (the initial state, step 0) and one ponder step on rows that
are each at their own step. After a ponder step the rows that halt go past the node with its
output; the others wait in the part's queue beside rows that have just entered, and the next
run takes a full batch of both, so freed slots are refilled with new inputs. The per-row loop
state (state, step, carry, ACT's running mean) travels with the rows as private values. Each
row's arithmetic is the per-batch loop's (halting.py), so outputs and steps are the same.
"""

from __future__ import annotations

import torch

from ..runtime.context import positions


def parts(node, pool_bodies: bool = False) -> list:
    """The node's two stream parts (functions of a RunContext), whatever `pool_bodies`."""
    k = node.name

    def enter(ctx) -> None:
        x = ctx.env[node.reads[0]]
        n = x.shape[0]
        h = ctx.env[f"{k}/h"] = node._init(ctx, x)
        ctx.env[f"{k}/t"] = torch.zeros(n, dtype=torch.long, device=x.device)
        ctx.env[f"{k}/carry"] = x.new_ones(n) if node.rule == "pondernet" else x.new_zeros(n)
        if node.rule == "act":
            ctx.env[f"{k}/acc"] = torch.zeros_like(h)

    def ponder(ctx) -> dict:
        env = ctx.env
        x, t, carry, prev = env[node.reads[0]], env[f"{k}/t"], env[f"{k}/carry"], env[f"{k}/h"]
        h = steps_at(node, ctx, t, prev, x)
        halt, new_carry, p = node._decide(ctx, t, h, x, carry, prev)
        halt = halt | (t == node.max_steps - 1)
        acc = env.get(f"{k}/acc")
        if acc is not None:
            acc = env[f"{k}/acc"] = node._weigh(acc, halt, carry, p, h)
        gone = positions(halt)
        ctx.record("steps", node.index, (t + 1).index_select(0, gone), where=gone)
        env[node.writes] = acc if acc is not None else h
        env[f"{k}/h"], env[f"{k}/t"], env[f"{k}/carry"] = h, t + 1, new_carry
        return {0: positions(~halt), None: gone}

    return [enter, ponder]


def steps_at(node, ctx, t: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The step on rows each at its own step `t` [rows] (one call per distinct step where
    the node's steps are not shared)."""
    flag = [(t == 0).to(x.dtype).unsqueeze(1)] if node.flag else []
    if len(node.steps) == 1:
        return ctx.call(node.steps[0], h, x, *flag)
    out = torch.empty_like(h)
    for s in t.unique().tolist():
        pos = positions(t == s)
        args = [a.index_select(0, pos) for a in (h, x, *flag)]
        out.index_copy_(0, pos, ctx.call(node.steps[s], *args, count=pos))
    return out
