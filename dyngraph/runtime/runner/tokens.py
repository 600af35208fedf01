"""The runner's per-token steps (runtime/runner): per-token exits (CALM) with the layers after
them, and halting over depth per position (Universal Transformer), as dyngraph's infer mode
runs them (constructs/token_exit.py, runtime/token_rows.py, constructs/token_halting.py).

A token that left or halted keeps its state, which the later layers read as a key and a value;
only the running tokens compute the rest. Such a layer exports twice: its unit (every token
runs) and its `rows` program (its `forward_rows`: keys and values for every token, queries
and MLP for the running ones, on a query grid padded per sequence), which the runner feeds a
grid built here. A sequence whose tokens have all left leaves the pass. Imports nothing but
torch.
"""

from __future__ import annotations

import math

import torch

from .state import Pass, _rows_of
from .steps import _stays

ACTIVE, EXIT_AT, OUT = "tokens/active", "tokens/exit_at", "tokens/out"  # (states: compacted
# with the rows, as dyngraph's TokenRows)


def query_grid(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, slots, mask) of the running tokens `active` [b, L] (blocks/sequence.py's
    `query_grid`): their flat positions, their places in a [b, width] grid of queries, and
    the additive causal mask [b, 1, width, L] by original position (a padded query reads
    position 0)."""
    b, n = active.shape
    counts = active.sum(1)
    width = int(counts.max()) if b else 0
    rows = active.reshape(-1).nonzero().flatten()
    sample = torch.div(rows, n, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts
    slots = sample * width + torch.arange(rows.numel(), device=rows.device) - first[sample]
    pos = torch.zeros(b * width, dtype=torch.long, device=rows.device)
    pos = pos.index_copy_(0, slots, rows - sample * n).view(b, 1, width, 1)
    keys = torch.arange(n, device=rows.device).view(1, 1, 1, n)
    mask = torch.zeros((b, 1, width, n), device=rows.device).masked_fill_(keys > pos, -math.inf)
    return rows, slots, mask


def _grid(p: Pass, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`query_grid(active)`, in one call of the fused kernel where it applies (~15 ATen ops)."""
    if p.k is None or torch.get_default_dtype() != torch.float32:  # (its mask is float32)
        return query_grid(active)
    return p.k.query_grid(active)[:3]


def _token_exit(p: Pass, s: dict) -> None:
    """A per-token exit: the head on the running tokens; those meeting the criterion leave
    (their logits kept, their states frozen); a sequence with no token left leaves."""
    x = p.env[s["reads"][0]]
    b, n, d = x.shape
    if ACTIVE not in p.states:
        p.states[ACTIVE] = torch.ones(b, n, dtype=torch.bool, device=x.device)
        p.states[EXIT_AT] = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    active = p.states[ACTIVE]
    p.routed.append((s["head"], p.idx, active.sum(1)))
    if p.every_token:
        flat, tokens = torch.arange(b * n, device=x.device), x
    else:
        flat = active.reshape(-1).nonzero().flatten()
        tokens = x.reshape(b * n, d).index_select(0, flat).view(1, -1, d)
    z = p.call(s["head"], tokens).reshape(flat.shape[0], -1)
    go = None  # positions among the running tokens of those leaving (None: all)
    if not s["last"]:
        go = torch.where(~(_stop_stays(p, s, tokens) if s.get("stop") is not None
                           else _stays(p, s, z)))[0]  # fmt: skip
        if go.shape[0] == 0:
            return
        if go.shape[0] == z.shape[0]:
            go = None
    rows = flat if go is None else flat.index_select(0, go)
    out = p.states.get(OUT)
    if out is None:
        out = p.states[OUT] = z.new_zeros((b, n, z.shape[1]))
    p.put(out.view(b * n, -1), rows, z, go)
    p.states[ACTIVE] = active = active.view(-1).index_fill(0, rows, False).view(b, n)
    p.states[EXIT_AT] = p.states[EXIT_AT].view(-1).index_fill(0, rows, s["index"]).view(b, n)
    p.every_token = False
    if go is None:  # every token has left
        p.leave(out, s["index"])
        p.rows = 0
        return
    stay = torch.where(active.any(1))[0]
    if stay.shape[0] < b:  # (rows that stay are written again where they leave)
        p.leave(out, s["index"])
        p.keep(stay, s["live_after"])


def _stop_stays(p: Pass, s: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Criterion `learned`: the stop unit on the running tokens (the head's input); those with
    sigmoid(logit) < threshold go on."""
    p.routed.append((s["stop"], p.idx, p.states[ACTIVE].sum(1)))
    q = torch.sigmoid(p.call(s["stop"], tokens).reshape(-1))
    return q < s["threshold"]


def _token_rows(p: Pass, s: dict) -> None:
    """A layer after a per-token exit: the running tokens updated, the frozen ones kept."""
    x, u = p.env[s["reads"][0]], s["unit"]
    b, n, d = x.shape
    active = p.states[ACTIVE]
    if s["per_token"]:
        p.routed.append((u, p.idx, active.sum(1)))
    else:
        p.queries.append((u, p.idx, active.long()))
    if p.every_token:
        p.env[s["writes"]] = p.call(u, x)[0]
        return
    p.calls.append((u, p.idx, None))
    flat = active.reshape(-1).nonzero().flatten()
    if s["per_token"]:
        new = p.m.units[u](x.reshape(b * n, d).index_select(0, flat).view(1, -1, d))[0]
    else:
        new = p.m.rows[u](x, *_grid(p, active))
    y = x.clone()
    p.put(y.view(b * n, d), flat, new.reshape(-1, d))
    p.env[s["writes"]] = y


def _token_halting(p: Pass, s: dict) -> None:
    """ACT over depth per position: the shared step runs on the running positions, each
    halting on its own; a sequence leaves the loop when all its positions have halted, its
    output the halting-weighted mean of each position's states."""
    x, u = p.env[s["reads"][0]], s["unit"]
    b, n, d = x.shape
    out, all_steps = torch.empty_like(x), torch.empty(b, n, dtype=torch.long, device=x.device)
    steps = torch.zeros(b, n, dtype=torch.long, device=x.device)
    st, acc, cum = x.clone(), torch.zeros_like(x), x.new_zeros(b, n)
    running = torch.ones(b, n, dtype=torch.bool, device=x.device)
    pos, last = None, s["max_steps"] - 1  # (pos: the sequences in the loop, among the pass's)
    for t in range(s["max_steps"]):
        p.queries.append((u, _rows_of(p.idx, pos), running.long()))
        p.calls.append((u, p.idx, pos))
        bn = st.shape[0] * n
        flat = running.reshape(-1).nonzero().flatten()
        if flat.shape[0] == bn:
            new, q = p.m.units[u](st)
            new, q = new.reshape(bn, d), q.reshape(bn)
        else:
            new, q = p.m.rows[u](st, *_grid(p, running))
        c = cum.reshape(-1).index_select(0, flat)
        halt = torch.ones_like(q, dtype=torch.bool) if t == last else c + q >= 1 - s["epsilon"]
        w = torch.where(halt, 1 - c, q)
        acc.view(bn, d).index_add_(0, flat, new * w.unsqueeze(1))
        p.put(st.view(bn, d), flat, new)
        p.put(cum.view(-1), flat, c + q)
        steps.view(-1).index_add_(0, flat, torch.ones_like(flat))
        running = running.reshape(-1).index_fill(0, flat[halt], False).view_as(running)
        done = ~running.any(1)
        if not bool(done.any()):
            continue
        gone = torch.where(done)[0]
        rows = gone if pos is None else pos.index_select(0, gone)
        out.index_copy_(0, rows, acc.index_select(0, gone))
        all_steps.index_copy_(0, rows, steps.index_select(0, gone))
        keep = torch.where(~done)[0]
        if keep.shape[0] == 0:
            break
        pos = keep if pos is None else pos.index_select(0, keep)
        st, acc, cum, running, steps = st[keep], acc[keep], cum[keep], running[keep], steps[keep]
    p.record("steps", s["index"], all_steps.sum(1))
    p.env[s["writes"]] = out


TOKEN_STEPS = {"token_exit": _token_exit, "token_rows": _token_rows,
               "token_halting": _token_halting}  # fmt: skip
