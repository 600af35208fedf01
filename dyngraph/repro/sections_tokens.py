"""The sections of docs/reproductions.md for per-token decisions (issue 16): ACT through time,
Mixture-of-Depths and per-token exits (sections.py holds the others)."""

from __future__ import annotations

from .calm import needed_exit, policy_fraction
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


def section_calm(r) -> list[str]:
    c, sp = r["chosen"], r["spec"]
    e = r["exit_by_position"]["mean"]
    return [
        "## Per-token early exits (CALM, Schuster et al. 2022) on per-position state tracking",
        "",
        "**Claim.** Letting each token leave at the first layer whose prediction is confident, "
        "its state frozen for the later layers (which still read it as a key and a value), "
        "spends compute where a token needs it: at equal MACs it beats a static model and the "
        "same network with every token leaving at one fixed layer (CALM's baseline), and harder "
        "tokens leave later.",
        "",
        "**Setup.** state_tokens with `full: true`, as for Mixture-of-Depths (the state after "
        "every step of a 16-step walk; a later position composes more steps). "
        "`specs/calm_tagger.yaml`: an embedding (d = 64), 4 causal pre-LN layers (4 heads, MLP "
        "2x), a per-token exit (`token_classifier`, max_prob criterion) after each; every exit "
        "trained on every token (the mean of their losses, distillation from the last exit at "
        "T = 3, weight 0.5); AdamW 2e-3, one-cycle, batch 128, 1,000 steps. Baselines, their "
        "accuracy interpolated at the exit model's MACs: static models of depth 1..4 (the same "
        "embedding, layers and head) trained alike, and the exit model itself with every token "
        "leaving at exit k. Two thresholds: the most accurate on the validation split among "
        "those whose mean MACs (heads and every frozen token's keys and values included) are at "
        "most 50% of the static 4-layer model's (issue 16's budget), and the spec's 0.9. Infer "
        f"time one thread, B = 256, interleaved rounds. {_seeds(r)}.",
        "",
        f"- Threshold 0.9: **{_pct(sp['accuracy'])}** at "
        f"{pm(sp['macs_fraction'], 100, '.1f', '%')} of the static 4-layer model's MACs; static "
        f"at the same MACs {_pct(sp['static_same_macs'])} ({pm(sp['gain_points'], 1, '+.2f')} "
        f"points); the same model at fixed exits {_pct(sp['fixed_same_macs'])} "
        f"({pm(sp['gain_over_fixed'], 1, '+.2f')} points). Infer time "
        f"{pm(sp['time_fraction'], 100, '.1f', '%')} of the static 4-layer model's: at d = 64 "
        "and L = 16 the index work after each exit (the query grid, gathers, writes) costs more "
        "than the 17% of MACs it saves.",
        f"- Within 50% of the MACs: the validation picks threshold "
        f"{pm(c['threshold'], 1, '.2f')}, every token leaving at the first exit "
        f"({_pct(c['accuracy'])} at {pm(c['macs_fraction'], 100, '.1f', '%')} of the MACs, "
        f"{pm(c['gain_points'], 1, '+.2f')} points against static depth): keys and values of "
        "every frozen token at every later layer cost a quarter of a running token's, so a mix "
        "of exits costs over 70% of the MACs here; no threshold lands between.",
        _why_not_half(len(e)),
        *_position_stop(r),
        "- Fixed exits of the same model (MACs, accuracy): "
        + ", ".join(
            f"exit {f['exit']} {100 * f['macs_fraction']:.0f}% {_pct(f['accuracy'])}"
            for f in r["fixed"]
        )
        + "; static depth 1..4: "
        + ", ".join(_pct(s["accuracy"]) for s in r["static"])
        + ". The exit model at full depth beats the static 4-layer model: every exit's loss "
        "trains the lower layers (deep supervision), which is part of the gain over static depth "
        "and none of the gain over fixed exits.",
        "- Exit per token by position at 0.9 (seed mean, 0..3): "
        + ", ".join(f"{v:.2f}" for v in e)
        + ".",
        "",
        *claims_table("calm", r),
        "![calm](repro/calm.png)",
        "",
        f"Regenerate: `python -m dyngraph.repro calm` ({_minutes(r)}).",
        "",
    ]


def _why_not_half(length: int) -> str:
    """What a per-token exit policy costs on this task (calm.policy_fraction): why no
    confidence threshold meets the 50% budget, and what could."""
    need = [needed_exit(p) for p in range(length)]
    half = length // 2
    give_up = [x if p < half else 0 for p, x in enumerate(need)]
    groups = {}
    for p, x in enumerate(need):
        groups.setdefault(x, []).append(p)
    spans = "; ".join(f"{g[0]}-{g[-1]}: {x}" for x, g in groups.items())
    return (
        "- Why no confidence threshold meets the 50% budget here, and what could (each "
        "policy's MACs counted as the trace counts them, frozen keys and values included; "
        "`calm.policy_fraction`): a position p composes p + 1 steps, and a causal layer at best "
        "doubles the steps a token holds, so it needs exit max(0, ceil(log2(p + 1)) - 1) "
        f"(positions {spans}). Giving every token exactly that depth costs "
        f"{100 * policy_fraction(need):.1f}% of the static 4-layer model's MACs. Giving "
        f"positions 0-{half - 1} their depth and stopping {half}-{length - 1} at the first exit "
        f"costs {100 * policy_fraction(give_up):.1f}%: at that doubling it holds positions "
        f"0-{half - 1}, where two layers for every token (every token at exit 1: "
        f"{100 * policy_fraction([1] * length):.1f}%) hold 0-3. A confidence "
        "criterion (max_prob, entropy: CALM's) cannot choose that: a token that no depth will "
        "solve never becomes confident, so it runs to the last exit. A stop decision trained on "
        "which depth helps each token (an oracle depth that trades likelihood against depth, as "
        "the Depth-Adaptive Transformer, Elbayad et al. 2020, trains its per-token halting) "
        "can: criterion `learned`, below."
    )


def _position_stop(r: dict) -> list[str]:
    """The stop-by-position bound (calm.position_stop), where the results have it."""
    ps = r.get("position_stop")
    if ps is None:
        return []
    policies = "; ".join(" ".join(map(str, p)) for p in ps["policies"])
    return [
        "- What a learned stop could reach (reported, not claimed; `calm.position_stop`): a stop "
        "decided by position alone, chosen on the validation split (one position moved to a "
        "deeper exit at a time, the most accuracy per MAC, within 50%), gives on the test split "
        f"{_pct(ps['accuracy'])} at {pm(ps['macs_fraction'], 100, '.1f', '%')} of the MACs "
        f"against {_pct(ps['same_macs'])} for static depth at the same MACs: "
        f"{pm(ps['gain_points'], 1, '+.2f')} points (worst seed {ps['gain_points']['worst']:+.2f}). "
        f"Its exits by position (per seed): {policies} — the middle positions go deepest, the "
        "ones no depth solves leave first. A per-token stop reading the token's state can "
        "express such a policy (and more: it sees which token it is).",
        *_learned(r),
    ]


def _learned(r: dict) -> list[str]:
    """The learned stop (calm.learned_stop), where the results have it."""
    ls = r.get("learned")
    if ls is None:
        return []
    e = ", ".join(f"{v:.2f}" for v in ls["exit_by_position"]["mean"])
    return [
        "- **A learned stop** (criterion `learned`, CALM's early-exit classifier: "
        "specs/calm_learned.yaml, the same model with a stop unit at exits 0-2, a LayerNorm and a "
        "linear map of the token's state, trained beside it on detached states towards "
        '"going deeper would not make this token right": 1 where the exit\'s prediction is '
        "right or the last exit's is wrong too), its threshold the most accurate on the "
        f"validation split within 50% of the MACs ({pm(ls['threshold'], 1, '.2f')}): "
        f"**{_pct(ls['accuracy'])}** at {pm(ls['macs_fraction'], 100, '.1f', '%')} of the "
        f"MACs (stop units counted) against {_pct(ls['same_macs'])} for static depth at the "
        f"same MACs: **{pm(ls['gain_points'], 1, '+.2f')} points** (worst seed "
        f"{ls['gain_points']['worst']:+.2f}). Exit by position (seed mean): {e}.",
    ]


SECTIONS = {"act_time": section_act_time, "mod": section_mod, "calm": section_calm}
