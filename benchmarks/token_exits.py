"""Per-token threshold exits, the whole model: does the MAC fraction of a CALM exit become time?

    python benchmarks/token_exits.py            # writes benchmarks/RESULTS-token-exits.md
    python benchmarks/token_exits.py --quick    # L = 64 only, shorter timing (not kept in git)

A token embedding (d = 128), a per-token exit (`exit: {per: token}`, a token_classifier head),
one causal pre-LN transformer layer (4 heads, MLP 4x) and the last exit, B = 32, L = 64 and
256, one thread, eager units. The first exit's decisions are forced (dyngraph.forcing): each
token goes on with probability c, drawn from its state, so sequences run different numbers of
tokens, as a threshold would choose them. Timed in interleaved rounds, in the same run:
  static   = embedding, the layer on every token, a per-token head
  dyngraph = the exit model's infer pass (both heads, the decisions, the running rows, the layer
             on the running tokens with every token a key and a value, the outputs assembled)
  masking  = its dense mode: the layer on every token, then where(running, new, old)
  oracle   = the same units called directly: embedding and the first head on every token,
             the layer's units at their sizes on the embedding's output and pre-made running
             rows (token_rows.oracle_layer), the last head on the running tokens (no
             decisions, no index ops)
Columns: f = MAC fraction (the model's MACs per input, both heads included, / the static
model's), waste = MACs executed past the ideal over the ideal (`trace.query_padding_macs`),
t = time fraction (dyngraph / static), and the oracle's and masking's fractions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dyngraph as dg
from dyngraph.forcing import forced
from dyngraph.runtime.token_rows import grid_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_cli  # noqa: E402
from run import time_interleaved  # noqa: E402
from token_rows import oracle_layer, table  # noqa: E402  (the same columns)

D, B, VOCAB = 128, 32, 32
LAYER = {"type": "transformer_block", "heads": 4, "mlp_ratio": 4, "causal": True}
HEAD = {"type": "token_classifier", "classes": 8}


def spec(length: int, exits: bool) -> dict:
    """The static model, or its version with a per-token exit before the layer."""
    first = {"exit": {"per": "token", "head": dict(HEAD),
                      "criterion": {"type": "max_prob", "threshold": 0.9}}}  # fmt: skip
    last = {"exit": {"per": "token", "head": dict(HEAD)}}
    body = [first, dict(LAYER), last] if exits else [dict(LAYER), dict(HEAD)]
    return {
        "dyngraph": 1,
        "name": "exit_bench" if exits else "static_bench",
        "input": {"shape": [length], "dtype": "int64", "vocab": VOCAB, "pad_id": 0},
        "task": {"type": "classification", "classes": 8, "per": "token"},
        "graph": [{"type": "embedding", "vocab": VOCAB, "dim": D}, *body],
    }


@torch.no_grad()
def measure(length: int, c: float, min_run_time: float) -> dict:
    torch.manual_seed(0)
    static = dg.compile(spec(length, False), backend="none").eval()
    torch.manual_seed(0)
    model = dg.compile(spec(length, True), backend="none").eval()
    ids = torch.randint(1, VOCAB, (B, length), generator=torch.Generator().manual_seed(1))
    embed, head0, layer, head1 = (model.units[i] for i in range(4))
    blk = next(iter(layer.module.children()))
    with forced(model, exit=1 - c):
        out = model(ids)
        running = out.trace.tokens["exit"] != 0  # the tokens that go on past exit 0
        f = float(model.per_input_macs(out.trace).double().mean()) / static.static_macs()
        x = embed(ids)[0]
        grid = grid_of(running)
        layer_oracle = oracle_layer(blk, x, grid)
        xr = torch.randn(1, grid.rows.numel(), D)

        def oracle():
            h = embed(ids)[0]  # (the embedding's own output, as the pass reads it)
            head0(h)
            layer_oracle(h)
            return head1(xr)

        t = time_interleaved(
            {"static": lambda: static(ids), "dyngraph": lambda: model(ids),
             "masking": lambda: model(ids, mode="dense"), "oracle": oracle},
            min_run_time,
        )  # fmt: skip
    return {
        "L": length,
        "c": c,
        "run": float(running.float().mean()),
        "waste": out.trace.query_padding_macs / float(model.per_input_macs(out.trace).sum()),
        "f": f,
        **token_cli.fractions(t, "static"),
    }


def main() -> None:
    token_cli.main(
        __doc__,
        "Per-token threshold exits, the whole model (benchmarks/token_exits.py)",
        f"eager units, B = {B}, d = {D}: embedding, a per-token exit (forced: each token goes "
        "on with probability c), one causal transformer layer (4 heads, MLP 4x), the last "
        "exit; fractions are of the static model's time (embedding, layer, head).",
        measure,
        (0.5, 0.25, 0.125),
        table,
        "RESULTS-token-exits",
    )


if __name__ == "__main__":
    main()
