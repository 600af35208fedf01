"""Per-token compaction: does a Mixture-of-Depths gate's MAC fraction become its time fraction?

    python benchmarks/tokens.py            # writes benchmarks/RESULTS-tokens.md
    python benchmarks/tokens.py --quick    # L = 64 only, shorter timing (not kept in git)

One causal pre-LN transformer layer (d = 128, 4 heads, MLP 4x) between a token embedding and a
per-token head, B = 32, L = 64 and 256, one thread, eager units. A `per: token` gate with `capacity` c routes the top
c·L tokens of each sequence through the layer. Timed in interleaved rounds, in the same run:
  static   = embedding, the layer on every token, the per-token head
  dyngraph = the MoD model's infer pass (embedding, router, gather, the layer on [B, c·L],
             scatter, head)
  masking  = embedding, router, the layer on every token, the routed tokens selected, head
  oracle   = the same units called directly: embedding, router and head on [B, L], the layer
             on pre-gathered [B, c·L] tokens (no gather, no scatter, no decisions)
  fixed    = the embedding and the head alone (what every model here runs on every token)
Columns: f = MAC fraction (the model's MACs per input, router included, / the static
model's), t = time fraction (dyngraph / static), and the oracle's and masking's fractions;
"layer only": the same with the fixed part taken off both sides, (t - fixed) / (1 - fixed):
the gated layer's time (router, routing, gather, layer, scatter) against the full layer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dyngraph as dg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_cli  # noqa: E402
from run import time_interleaved  # noqa: E402

D, B, VOCAB = 128, 32, 32
LAYER = {"type": "transformer_block", "heads": 4, "mlp_ratio": 4, "causal": True}
HEAD = {"type": "token_classifier", "classes": 8}


def spec(length: int, capacity: float | None) -> dict:
    """The static model (capacity None) or its MoD version."""
    layer = (
        dict(LAYER)
        if capacity is None
        else {
            "gate": {
                "per": "token",
                "capacity": capacity,
                "body": dict(LAYER),
                "policy": {"type": "token_router"},
            }
        }
    )
    return {
        "dyngraph": 1,
        "name": "mod_bench" if capacity else "static_bench",
        "input": {"shape": [length], "dtype": "int64", "vocab": VOCAB, "pad_id": 0},
        "task": {"type": "classification", "classes": 8, "per": "token"},
        "graph": [{"type": "embedding", "vocab": VOCAB, "dim": D}, layer, dict(HEAD)],
    }


@torch.no_grad()
def measure(length: int, capacity: float, min_run_time: float) -> dict:
    torch.manual_seed(0)
    static = dg.compile(spec(length, None), backend="none").eval()
    torch.manual_seed(0)
    mod = dg.compile(spec(length, capacity), backend="none").eval()
    gate = mod.gates[0]
    head = mod.units[-1]
    ids = torch.randint(1, VOCAB, (B, length), generator=torch.Generator().manual_seed(1))
    out = mod(ids)
    k = int(out.trace.gates[0, 0])
    f = float(mod.per_input_macs(out.trace).double().mean()) / static.static_macs()
    embed = mod.units[0]
    x = embed(ids)[0]  # what the gate reads
    xk = x[:, :k].contiguous()

    def masking():
        h = embed(ids)[0]
        p = gate.policy(h)
        top = p.topk(k, dim=1).indices
        on = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top, True)
        y = gate.body(h)
        return head(torch.where(on[..., None], h + p[..., None] * (y - h), h))

    def oracle():
        h = embed(ids)[0]  # (the embedding's own output, as the pass reads it)
        gate.policy(h)
        gate.body(xk)
        return head(h)

    def fixed():
        return head(embed(ids)[0])

    t = time_interleaved(
        {"static": lambda: static(ids), "dyngraph": lambda: mod(ids), "masking": masking,
         "oracle": oracle, "fixed": fixed},
        min_run_time,
    )  # fmt: skip
    return {
        "L": length,
        "c": capacity,
        "k": k,
        "f": f,
        **token_cli.fractions(t, "static"),
        "fixed": t["fixed"] / t["static"],
    }


def layer_only(r: dict, key: str) -> float:
    """`key`'s time fraction with the embedding and head (`fixed`) taken off both sides."""
    return (r[key] - r["fixed"]) / (1 - r["fixed"])


def table(rows: list[dict]) -> str:
    lines = [
        "| L | c | k | f (MACs) | t (dyngraph) | oracle | masking | dyngraph / oracle | "
        "t <= c + 0.05 | speedup vs masking / oracle's | fixed | layer only: t | oracle |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # faster than masking by at least 0.9x the oracle's speedup over masking
        ratio = token_cli.speedup_share(r)
        lines.append(
            f"| {r['L']} | {r['c']} | {r['k']} | {r['f']:.3f} | {r['t']:.3f} | "
            f"{r['oracle']:.3f} | {r['masking']:.3f} | {r['t'] / r['oracle']:.3f} | "
            f"{'yes' if r['t'] <= r['c'] + 0.05 else 'NO'} | {ratio:.3f} | {r['fixed']:.3f} | "
            f"{layer_only(r, 't'):.3f} | {layer_only(r, 'oracle'):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    token_cli.main(
        __doc__,
        "Per-token compaction: Mixture-of-Depths (benchmarks/tokens.py)",
        f"eager units, B = {B}, d = {D}, one causal transformer layer (4 heads, MLP 4x) and a "
        "per-token head; fractions are of the static model's time (embedding, layer, head), "
        "and, under 'layer only', of the layer's (the embedding and head taken off).",
        measure,
        (0.5, 0.25, 0.125),
        table,
        "RESULTS-tokens",
    )


if __name__ == "__main__":
    main()
