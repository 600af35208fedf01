"""Per-token costs of a sequence model: each token's MACs, MACs by position, depth per token.

A unit that ran on m tokens of a sequence cost C(m) MACs (its cost at length m). That cost is
shared among its m query rows as attention counts them:
- a unit holding causal attention: row i (1-based) costs C(i) - C(i - 1), what adding it
  to the first i - 1 rows costs (its QK and AV products read i keys; the rest is per row);
- any other unit: each row reads every key, so the rows cost the same, C(m) / m (the
  integer remainder goes to the last row). A sequence-level head (a pooled classifier,
  a gate's policy) is shared this way too.
A sequence's token MACs therefore sum exactly to its per-input MACs.
"""

from __future__ import annotations

import torch

from ..runtime.lengths import causal_units, query_token_macs


def token_macs(model, trace, counter: str = "fvcore", width: int | None = None) -> torch.Tensor:
    """[B, width] the MACs of each token (0 for padding; width: default the longest length);
    each row sums to the sequence's per-input MACs."""
    lengths = trace.lengths.cpu()
    counts = trace.unit_counts.cpu()
    top = int(lengths.max()) if lengths.numel() else 0
    b, full = counts.shape[0], width or top
    if b == 0:
        return torch.zeros(0, full, dtype=torch.long)
    table = torch.stack([model.unit_macs(counter, m) for m in range(1, top + 1)])
    table = torch.cat([torch.zeros_like(table[:1]), table]).tolist()  # [L + 1][U]
    causal = causal_units(model)
    routed = {u: (t.cpu() == 1) for u, t in trace.unit_tokens.items()}
    per_row = {u: t.cpu().clamp_min(0) for u, t in trace.token_counts.items()}
    queries = trace.unit_queries
    out = torch.zeros(b, full, dtype=torch.long)
    for u in range(counts.shape[1]):
        if u in queries:  # partial queries: each token's share is its own (lengths.py)
            for r in queries[u]:
                q = query_token_macs(model, u, r, lengths, counter)
                out[:, : q.shape[1]] += q
            continue
        for s in counts[:, u].nonzero().flatten().tolist():
            n, c = int(lengths[s]), int(counts[s, u])
            if u in per_row:  # run a token at a time: each position pays its own runs
                out[s, :n] += per_row[u][s, :n] * table[n][u]
                continue
            rows = routed[u][s].nonzero().flatten() if u in routed else torch.arange(n)
            m = rows.numel()
            if m == 0:
                continue
            if causal[u]:
                share = [table[i][u] - table[i - 1][u] for i in range(1, m + 1)]
            else:
                total = table[m][u]
                share = [total // m] * m
                share[-1] += total - (total // m) * m
            out[s, rows] += c * torch.tensor(share, dtype=torch.long)
    return out


def depth_per_token(trace, model=None) -> torch.Tensor | None:
    """[B, L] each token's depth (-1: padding): the per-token gates that routed it through
    their body, the layers it ran after a per-token exit, plus its ponder steps under halting
    through time (exit heads and per-token decisions are not depth); None without per-token
    decisions."""
    heads = set() if model is None else {u.index for u in model.units if u.head}
    kinds = {n: k for (u, n), k in trace._token_kinds.items() if u not in heads and k != "decision"}
    if not trace.tokens:
        return None
    t = torch.stack([v.cpu() for v in trace.tokens.values()])  # [N, B, L]: -1 where padded
    depth = sum(
        (
            v.cpu().clamp_min(0) if kinds[name] == "steps" else (v.cpu() == 1).long()
            for name, v in trace.tokens.items()
            if name in kinds
        ),
        torch.zeros(t.shape[1:], dtype=torch.long),
    )
    return torch.where((t == -1).all(0), torch.full_like(depth, -1), depth)


def summary(macs: torch.Tensor, lengths: torch.Tensor, depth: torch.Tensor | None) -> dict:
    """Means by position (over the sequences that reach it) and the depth histogram."""
    valid = torch.arange(macs.shape[1])[None] < lengths[:, None]
    per = valid.sum(0).clamp_min(1)
    out = {
        "mean_macs_by_position": ((macs * valid).sum(0).double() / per).tolist(),
        "mean_token_macs": float(macs[valid].double().mean()),
    }
    if depth is not None:
        d = depth[valid]
        out["depth_histogram"] = {int(v): int((d == v).sum()) for v in d.unique()}
        out["mean_depth_by_position"] = (
            (depth.clamp_min(0) * valid).sum(0).double() / per
        ).tolist()
    return out


def per_token(model, trace, counter: str, width: int) -> tuple:
    """(token MACs [B, width], lengths [B], depth [B, width] or None) of one batch."""
    depth = depth_per_token(trace, model)
    if depth is not None and depth.shape[1] < width:
        depth = torch.nn.functional.pad(depth, (0, width - depth.shape[1]), value=-1)
    return token_macs(model, trace, counter, width), trace.lengths.cpu(), depth


def merged(batches: list[tuple]) -> tuple:
    """`per_token` of every batch, concatenated."""
    macs, lengths, depth = zip(*batches, strict=True)
    return (
        torch.cat(macs),
        torch.cat(lengths),
        None if depth[0] is None else torch.cat(depth),
    )
