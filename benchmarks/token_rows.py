"""Per-token threshold exits, the layer kernel: some tokens run a transformer layer, every
token stays a key and a value (CALM's frozen states). Does the MAC fraction become time?

    python benchmarks/token_rows.py            # writes benchmarks/RESULTS-token-rows.md
    python benchmarks/token_rows.py --quick    # L = 64 only, shorter timing (not kept in git)

This times the kernel a per-token exit's later layers run (benchmarks/token_exits.py times the
whole model), `TransformerBlock.forward_rows`, on one causal pre-LN layer (d = 128,
4 heads, MLP 4x), B = 32, L = 64 and 256, one thread. The running tokens are chosen as a
threshold would choose them: each token independently with probability c, so sequences run
different numbers of tokens. Timed in interleaved rounds, in the same run:
  static   = the layer on every token
  dyngraph = the running tokens' rows from the mask (`grid_of`, the fused kernel: rebuilt per
             layer, as with an exit after every layer), `forward_rows` (attention per sample,
             runtime/attention.cpp), the new states written back in place
  masking  = the layer on every token, then `where(active, new, old)`
  oracle   = the same units at their sizes on pre-made inputs: LN1 and the KV projection on
             every token, the Q projection on the running tokens, the same attention kernel on
             pre-made queries, the output projection and the MLP on the running tokens (no
             index ops)
Columns: f = ideal MAC fraction (linears, and attention per query row over the keys it reads,
as the project counts it; the KV projection of every token included), waste = MACs executed
past the ideal, over the ideal (attention's blocks reading keys past a query's own position;
executed / ideal = 1 + waste), t = time fraction (dyngraph / static).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dyngraph.blocks.sequence import QUERY_BLOCK, TransformerBlock
from dyngraph.runtime import kernels
from dyngraph.runtime.token_rows import grid_of, padding_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_cli  # noqa: E402
from run import time_interleaved  # noqa: E402

D, B, HEADS, RATIO = 128, 32, 4, 4.0


def ideal_macs(active: torch.Tensor, d: int = D, ratio: float = RATIO) -> int:
    """MACs of the layer for the `active` tokens [b, L] of causal sequences: KV for every
    token, the rest per running token, attention over positions 0..i for the query at i."""
    b, n = active.shape
    run = int(active.sum())
    reads = int(((torch.arange(n) + 1) * active).sum())  # keys read, over running queries
    hidden = int(d * ratio)
    return b * n * 2 * d * d + run * (2 * d * d + 2 * d * hidden) + reads * 2 * d


def oracle_layer(blk: TransformerBlock, x: torch.Tensor, grid) -> Callable[[], torch.Tensor]:
    """The layer's units at their sizes on pre-made inputs, for the running tokens `grid` of
    `x` [b, L, D] (or of the x it is called with, the same shape): LN1 and the KV projection on every token, the Q projection on the running
    tokens, attention as `grid.attend` runs it (per sample, or SDPA on the padded grid) on
    pre-made queries, the output projection and the MLP on the running tokens (no index ops)."""
    b, n, d = x.shape
    heads, a, n_run = blk.attn.heads, blk.attn, grid.rows.numel()
    hq, xq = torch.randn(n_run, d), torch.randn(n_run, d)
    y_run = torch.randn(n_run, d)
    if grid.mask is None:
        q = torch.randn(n_run, d)

        def attend(kv):
            rows = torch.ops.dyngraph.rows_attention
            return rows(q, kv, grid.pos, grid.offsets, heads, QUERY_BLOCK, a.causal)
    else:
        grid_q = torch.randn(b, heads, grid.width, d // heads)

        def attend(kv):
            k, v = kv.view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(grid_q, k, v, attn_mask=grid.mask)

    def oracle(x: torch.Tensor = x):
        h = blk.norm1(x)
        attend(F.linear(h, a.qkv.weight[d:], a.qkv.bias[d:]))
        F.linear(hq, a.qkv.weight[:d], a.qkv.bias[:d])
        z = xq + a.proj(y_run)
        return z + blk.fc2(blk.act(blk.fc1(blk.norm2(z))))

    return oracle


@torch.no_grad()
def measure(length: int, c: float, min_run_time: float) -> dict:
    torch.manual_seed(0)
    blk = TransformerBlock(D, HEADS, RATIO, True, "gelu").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, length, D, generator=g)
    active = torch.rand(B, length, generator=g) < c
    grid = grid_of(active)
    n_run = grid.rows.numel()
    f = ideal_macs(active) / ideal_macs(torch.ones_like(active))
    state = x.clone()

    def dyngraph():
        grid = grid_of(active)  # an exit after every layer: a new grid each time (the kernel)
        new = blk.forward_rows(state, grid)
        state.view(-1, D).index_copy_(0, grid.rows, new)

    def masking():
        return torch.where(active[..., None], blk(x), x)

    t = time_interleaved(
        {
            "static": lambda: blk(x),
            "dyngraph": dyngraph,
            "masking": masking,
            "oracle": oracle_layer(blk, x, grid),
        },  # fmt: skip
        min_run_time,
    )
    return {
        "L": length,
        "c": c,
        "run": n_run / active.numel(),
        "waste": padding_macs([(blk, active, grid.padded)]) / ideal_macs(active),
        "f": f,
        **token_cli.fractions(t, "static"),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| L | c | tokens run | waste | f (MACs) | t (dyngraph) | oracle | masking | "
        "dyngraph / oracle | <= 1.10x oracle | speedup vs masking / oracle's | static ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        ratio = token_cli.speedup_share(r)
        lines.append(
            f"| {r['L']} | {r['c']} | {r['run']:.3f} | {r['waste']:.3f} | {r['f']:.3f} | "
            f"{r['t']:.3f} | {r['oracle']:.3f} | {r['masking']:.3f} | "
            f"{r['t'] / r['oracle']:.3f} | {'yes' if r['t'] <= 1.10 * r['oracle'] else 'NO'} | "
            f"{ratio:.3f} | {r['static_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    kernels.load()  # (as dg.compile does: the running tokens' kernels)
    token_cli.main(
        __doc__,
        "Per-token threshold exits, the layer kernel (benchmarks/token_rows.py)",
        f"B = {B}, d = {D}, one causal pre-LN transformer layer ({HEADS} heads, MLP {RATIO:g}x); "
        "each token runs with probability c, every token a key and a value; fractions are of "
        "the full layer's time.",
        measure,
        (0.5, 0.25, 0.125),
        table,
        "RESULTS-token-rows",
    )


if __name__ == "__main__":
    main()
