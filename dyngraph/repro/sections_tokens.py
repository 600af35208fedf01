"""The sections of docs/reproductions.md for per-token decisions (issue 16): ACT through time and
Mixture-of-Depths (sections.py holds the others)."""

from __future__ import annotations

from .common import pm
from .sections import _minutes, _pct, _seeds, claims_table


def section_act_time(r) -> list[str]:
    a = r["act"]
    return [
        "## ACT through time on addition (Graves 2016, §3.3)",
        "",
        "**Claim.** A recurrent network that ponders at every step of a sequence, each step "
        "halting on its own, is at least as accurate as the same network with a fixed number of "
        "steps per position at the same mean steps, and it ponders longer on harder steps.",
        "",
        "**Setup.** `specs/act_addition.yaml`: k = 1..5 one-digit numbers as ids (a deviation: "
        "Graves feeds digit vectors of up to 5 digits), the label at each position the sum so "
        "far (46 classes); an embedding (32) feeds a GRU cell of 128 that ponders at each position "
        "from the previous position's halting-weighted state (`halting: {rule: act, carry: "
        "true}`), at most 8 steps, epsilon 0.01, tau 1e-3, Adam 1e-3, batch 128, 3,000 steps. "
        "Baselines: the same network with 1, 2, 4 and 8 fixed steps per position (the halting "
        "unit biased never to halt, no ponder cost), trained alike; their accuracy interpolated "
        f"at ACT's mean steps. A step's difficulty: the carries its sum has made. {_seeds(r)}.",
        "",
        f"- ACT: **{_pct(a['accuracy'])}** per position at {pm(a['mean_steps'], 1, '.2f')} steps "
        f"per position; fixed steps at that mean: {_pct(a['fixed_same_steps'])} "
        f"({pm(a['gain_points'], 1, '+.2f')} points).",
        "- fixed steps per position: "
        + ", ".join(f"{f['steps']}: {_pct(f['accuracy'])}" for f in r["fixed"])
        + ".",
        f"- Spearman(ponder steps, carries so far) per position: {pm(a['spearman'], 1, '.2f')}. "
        "The difficulty measure was chosen after one training run of the recipe (seed 0), from "
        "the running sum, the carries so far, the position, a carry at this step and the number "
        "added (Spearman 0.85, 0.88, 0.70, 0.59 and 0.35 there).",
        "",
        *claims_table("act_time", r),
        "![act_time](repro/act_time.png)",
        "",
        f"Regenerate: `python -m dyngraph.repro act_time` ({_minutes(r)}).",
        "",
    ]


def section_mod(r) -> list[str]:
    d, p = r["deep"], r["paper"]
    dp = r["depth_by_position"]["mean"]
    return [
        "## Mixture-of-Depths on per-position state tracking (Raposo et al. 2024)",
        "",
        "**Claim.** Routing a capacity of each sequence's tokens through a block, the others "
        "around it, spends less compute per token for little loss; at equal MACs it beats a "
        "static model; and the saved MACs become saved time.",
        "",
        "**Setup.** state_tokens with `full: true`: walks of 16 steps over six permutations of "
        "five states, a label (the state) at every position, causal attention. Every model: "
        "an embedding (d = 64), causal pre-LN layers (4 heads, MLP 2x), a per-token head; AdamW "
        "2e-3, one-cycle, batch 128, 1,000 steps. (b) 2 layers then 6 per-token gates at "
        "capacity 25% against static models of depth 1..8 at the same mean MACs "
        "(interpolated). (c) `specs/mod_tagger.yaml`, the paper's layout, every other layer of 8 "
        "a gate at capacity 12.5%, against the dense 8-layer model at equal training steps; "
        f"infer time one thread, B = 256, interleaved rounds. {_seeds(r)}.",
        "",
        f"- (b): **{_pct(d['accuracy'])}** at {pm(d['macs_fraction'], 100, '.1f', '%')} of the "
        f"dense model's MACs; static at the same MACs {_pct(d['static_same_macs'])} "
        f"({pm(d['gain_points'], 1, '+.2f')} points). Depth per token by position (gates that "
        "routed it, of 6; seed mean): " + ", ".join(f"{v:.2f}" for v in dp) + ".",
        f"- (c): test loss {pm(p['loss'], 1, '.3f')} against the dense model's "
        f"{pm(p['dense_loss'], 1, '.3f')}; accuracy {_pct(p['accuracy'])} against "
        f"{_pct(p['dense_accuracy'])}; MACs {pm(p['macs_fraction'], 100, '.1f', '%')}, infer "
        f"time {pm(p['time_fraction'], 100, '.1f', '%')} of the dense model's. Routed by its "
        f"causal predictors instead (decoding, `set_decode(True)`): accuracy "
        f"{_pct(p['decode_accuracy'])} at {pm(p['decode_macs_fraction'], 100, '.1f', '%')} of the "
        f"MACs; a token's decision agrees with the top-k's "
        f"{pm(p['predictor_agreement'], 100, '.1f', '%')} of the time.",
        "- static depth 1..8: " + ", ".join(_pct(s["accuracy"]) for s in r["static"]) + ".",
        "",
        *claims_table("mod", r),
        "![mod](repro/mod.png)",
        "",
        f"Regenerate: `python -m dyngraph.repro mod` ({_minutes(r)}).",
        "",
    ]


SECTIONS = {"act_time": section_act_time, "mod": section_mod}
