"""Per-token metalayers: does a module chosen per token cost the time of the tokens' choices?

    python benchmarks/token_choices.py            # writes benchmarks/RESULTS-token-choices.md
    python benchmarks/token_choices.py --quick    # L = 64 only, shorter timing (not kept in git)

A token embedding (d = 128), one `metalayer: {per: token}` choosing per token between a small
residual MLP (hidden 16) and a causal transformer layer (4 heads, MLP 4x), a per-token head;
B = 32, L = 64 and 256, one thread, eager units. Each token takes the transformer layer with
probability p (forced: a draw from its own input), so sequences send different numbers of
tokens each way. Timed in interleaved rounds, in the same run:
  large    = every token through the transformer layer (forced): the reference
  dyngraph = the infer pass: the controller, each choice on its tokens (the MLP on every
             chosen token in one call; the layer per sequence, sequences grouped by count)
  masking  = embedding, controller, both choices on every token, each token's choice kept
  oracle   = the same unit calls as dyngraph on pre-gathered tokens (embedding, controller and
             head on [B, L]; no decisions, gathers or scatters)
Columns: f = MAC fraction (per-input MACs / the all-large model's), t = dyngraph's time
fraction, groups = the transformer layer's calls (distinct counts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dyngraph as dg
from dyngraph.forcing import forced

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_cli  # noqa: E402
from run import time_interleaved  # noqa: E402

D, B, VOCAB = 128, 32, 32
CHOICES = [
    {"type": "residual_mlp", "hidden": 16, "norm": True},
    {"type": "transformer_block", "heads": 4, "mlp_ratio": 4, "causal": True},
]


def spec(length: int) -> dict:
    return {
        "dyngraph": 1,
        "name": "token_choices_bench",
        "input": {"shape": [length], "dtype": "int64", "vocab": VOCAB, "pad_id": 0},
        "task": {"type": "classification", "classes": 8, "per": "token"},
        "controllers": {"ctl": {"type": "composer_rnn", "hidden": 32}},
        "graph": [
            {"type": "embedding", "vocab": VOCAB, "dim": D},
            {"metalayer": {"per": "token", "choices": CHOICES, "controller": "ctl"}},
            {"type": "token_classifier", "classes": 8},
        ],
    }


@torch.no_grad()
def measure(length: int, p: float, min_run_time: float) -> dict:
    torch.manual_seed(0)
    m = dg.compile(spec(length), backend="none").eval()
    ml = m.metalayers[0]
    embed, head = m.units[0], m.units[-1]
    ids = torch.randint(1, VOCAB, (B, length), generator=torch.Generator().manual_seed(1))
    with forced(m, metalayer=[0.0, 1.0]):
        large_macs = float(m.per_input_macs(m(ids).trace).double().mean())
    with forced(m, metalayer=[1 - p, p]):
        out = m(ids)
    f = float(m.per_input_macs(out.trace).double().mean()) / large_macs
    picked = out.trace.tokens["metalayer 0 choice 1"] == 1  # [B, L]
    x = embed(ids)[0]
    state = torch.zeros(B, length, 32)
    gamma = torch.zeros(B, 0)
    counts = picked.sum(1)
    small_in = x[~picked].unsqueeze(0).contiguous()
    groups = [
        x[counts == k][picked[counts == k]].view(-1, k, D).contiguous()
        for k in sorted(set(counts.tolist()) - {0})
    ]

    def dyngraph():
        with forced(m, metalayer=[1 - p, p]):
            return m(ids)

    def large():
        with forced(m, metalayer=[0.0, 1.0]):
            return m(ids)

    def masking():
        h = embed(ids)[0]
        logits, _ = ml.router(h, state, gamma)
        y = torch.where(picked[..., None], ml.choices[1](h), ml.choices[0](h))
        return head(y)

    def oracle():
        h = embed(ids)[0]  # (the embedding's own output, as the pass reads it)
        ml.router(h, state, gamma)
        ml.choices[0](small_in)
        for g in groups:
            ml.choices[1](g)
        return head(h)

    t = time_interleaved(
        {"large": large, "dyngraph": dyngraph, "masking": masking, "oracle": oracle},
        min_run_time,
    )
    return {
        "L": length,
        "p": p,
        "groups": len(groups),
        "f": f,
        **token_cli.fractions(t, "large"),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| L | p (layer) | groups | f (MACs) | t (dyngraph) | oracle | masking | "
        "dyngraph / oracle | speedup vs masking / oracle's | all-large ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = token_cli.speedup_share(r)
        lines.append(
            f"| {r['L']} | {r['p']} | {r['groups']} | {r['f']:.3f} | {r['t']:.3f} | "
            f"{r['oracle']:.3f} | {r['masking']:.3f} | {r['t'] / r['oracle']:.3f} | "
            f"{ratio:.3f} | {r['large_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    token_cli.main(
        __doc__,
        "Per-token metalayers (benchmarks/token_choices.py)",
        f"eager units, B = {B}, d = {D}: per token, a residual MLP (hidden 16) or a causal "
        "transformer layer (4 heads, MLP 4x), the layer taken with probability p; fractions are "
        "of the all-layer model's time.",
        measure,
        (0.5, 0.25, 0.125),
        table,
        "RESULTS-token-choices",
    )


if __name__ == "__main__":
    main()
