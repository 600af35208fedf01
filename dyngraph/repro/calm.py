"""CALM: per-token early exits on per-position state tracking with causal attention.

Claims (Schuster et al., 2022): letting each token leave at the first layer whose prediction is
confident, its state frozen for the later layers, spends compute where a token needs it; at
equal MACs it beats a static model of that depth. Here, on state_tokens with `full: true` (as
the Mixture-of-Depths reproduction: the state after every step of a 16-step walk, a label at
every position whose difficulty is its number of steps), specs/calm_tagger.yaml (4 causal
layers, d = 64, a per-token exit after each, every exit trained on every token with
self-distillation) against static models of depth 1..4 (mod.static_model), trained alike:
- (b) at the most accurate exit threshold on the validation split whose mean MACs are at most
  50% of the static 4-layer model's (issue 16's budget), and at the spec's threshold (0.9),
  test accuracy against static depth at the same MACs (interpolated) and against the same
  model with every token leaving at one fixed exit (CALM's static baseline); tokens at later
  positions leave later;
- the infer time at those thresholds against the static 4-layer model (one thread, B = 256);
- (b) with a learned stop (specs/calm_learned.yaml: the same model with criterion `learned` at
  exits 0..2, CALM's early-exit classifier), its threshold chosen on the validation split
  within the same budget: test accuracy against static depth at the same MACs.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import functools  # noqa: E402
import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..compiler.compile import compile as compile_spec  # noqa: E402
from ..constructs.exit_criteria import GRID_STOP  # noqa: E402
from ..runtime.lengths import frozen_macs  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    ROOT,
    claim,
    curve_stats,
    label,
    pm,
    save_figure,
    spearman,
    spec_dict,
    splits,
    stats,
    train_spec,
)
from .mod import infer_time, static_model  # noqa: E402

SPEC = "calm_tagger"
DEPTHS = range(1, 5)
BUDGET = 0.5  # of the static 4-layer model's MACs
#: exit thresholds (top probability) swept on the validation split; 1.01: no early exit
SPEC_THRESHOLD = 0.9  # specs/calm_tagger.yaml's
GRID = [0.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01]


@torch.no_grad()
def at_threshold(model, data, threshold: float) -> dict:
    """Accuracy and mean MACs at one exit threshold, and the mean exit by position."""
    model.set_threshold(threshold)
    r = evaluate(model, data)
    per = model(data.x).trace.tokens["exit"]
    valid = per >= 0
    by_pos = [float(per[:, i][valid[:, i]].float().mean()) for i in range(per.shape[1])]
    return {"threshold": threshold, "accuracy": r["quality"], "macs": r["mean_macs"],
            "exit_by_position": by_pos}  # fmt: skip


@torch.no_grad()
def fixed_exits(model, data) -> list[dict]:
    """The same model with every token leaving at exit k (k = 0..3): CALM's static baseline."""
    n = len(model.exits) - 1
    out = []
    for k in range(n + 1):
        model.set_threshold([1.01] * k + [0.0] * (n - k))
        r = evaluate(model, data)
        out.append({"exit": k, "accuracy": r["quality"], "macs": r["mean_macs"]})
    return out


def needed_exit(position: int) -> int:
    """The first exit that can hold the state at `position`: it composes position + 1 steps,
    and each causal layer at best doubles the steps a token holds."""
    return max(0, math.ceil(math.log2(position + 1)) - 1)


@functools.cache
def _costs(n: int) -> tuple[list, list[int], list[int], list[int]]:
    """specs/calm_tagger.yaml's per-unit MACs at lengths 0..n, its heads, the layers after
    its exits and what a frozen token costs each of them (compiled once per process)."""
    model = compile_spec(ROOT / "specs" / f"{SPEC}.yaml", backend="none")
    c = [[0] * len(model.units)] + [model.unit_macs("fvcore", k).tolist() for k in range(1, n + 1)]
    layers = [u.index for u in model.units if u.rows is not None]  # after exits 0..2
    frozen = [frozen_macs(model.units[u], "fvcore") for u in layers]
    return c, [e.head.index for e in model.exits], layers, frozen


def policy_fraction(exit_of: list[int]) -> float:
    """The MACs of specs/calm_tagger.yaml when the token at each position leaves at exit
    `exit_of[position]`, over the static 4-layer model's, counted as the trace counts them
    (runtime/lengths.py): a layer after an exit charges each running token its causal share
    and each frozen token its keys and values while any token of the sequence runs; each head
    its cost at the tokens that reach it."""
    n = len(exit_of)
    c, heads, layers, frozen = _costs(n)
    total = c[n][0]  # the embedding and the first layer, every token
    for e, head in enumerate(heads):
        reach = sum(x >= e for x in exit_of)
        total += c[reach][head]
        if e < len(layers) and any(x > e for x in exit_of):
            u = layers[e]
            total += sum(
                c[p + 1][u] - c[p][u] if x > e else frozen[e] for p, x in enumerate(exit_of)
            )
    static = c[n][0] + sum(c[n][u] for u in layers) + c[n][heads[-1]]
    return total / static


@torch.no_grad()
def correct_by_exit(model, data) -> torch.Tensor:
    """[exits, N, L] 1 where a token's prediction is right with every token leaving at exit k."""
    n = len(model.exits) - 1
    out = []
    for k in range(n + 1):
        model.set_threshold([1.01] * k + [0.0] * (n - k))
        out.append((model(data.x).logits.argmax(-1) == data.y).float())
    return torch.stack(out)


def position_stop(model, val, test) -> dict:
    """What a stop decided by position alone reaches within the budget (reported, not
    claimed): the policy `stop_policy` picks on the validation split, its test accuracy. A
    learned stop that reads a token's state (its position embedded in it) could express such
    a policy; no confidence criterion can."""
    v, t = correct_by_exit(model, val).mean(1), correct_by_exit(model, test).mean(1)  # [E, L]
    policy = stop_policy(v)
    return {"exit_by_position": policy, "accuracy": _accuracy(policy, t),
            "macs_fraction": policy_fraction(policy)}  # fmt: skip


def stop_policy(acc: torch.Tensor, budget: float = BUDGET) -> list[int]:
    """The exit of each position, from `acc` [exits, L] (each exit's accuracy by position):
    from the first exit everywhere, move one position to a deeper exit at a time (any deeper
    one: an exit that gains nothing may lead to one that does), the move that gains the most
    accuracy per MAC (`policy_fraction`), while the policy stays within `budget`."""
    policy = [0] * acc.shape[1]
    while True:
        best, base = None, (_accuracy(policy, acc), policy_fraction(policy))
        for i in range(len(policy)):
            for e in range(policy[i] + 1, acc.shape[0]):
                q = policy[:i] + [e] + policy[i + 1 :]
                if (f := policy_fraction(q)) > budget:
                    break  # (deeper costs more)
                gain = (_accuracy(q, acc) - base[0]) / (f - base[1])
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, q)
        if best is None:
            return policy
        policy = best[1]


def learned_spec() -> dict:
    """specs/calm_learned.yaml: specs/calm_tagger.yaml with a learned stop at exits 0..2
    (criterion `learned`: a stop unit per exit on the token's state, trained beside the model
    on detached states)."""
    return spec_dict("calm_learned")


def learned_stop(model, val, test, static: list[dict]) -> dict:
    """The learned stop at its most accurate threshold on the validation split within the
    budget (calibrate's grid for it, finer where the MACs cross the budget): test accuracy and
    MACs, against static depth at the same MACs, and the test split's whole sweep (`curve`)."""
    full = static[-1]["macs"]
    chosen = _best_within([at_threshold(model, val, t) for t in GRID_STOP], full)
    curve = [at_threshold(model, test, t) for t in GRID_STOP]
    b = next(c for c in curve if c["threshold"] == chosen)
    return (
        b
        | {"macs_fraction": b["macs"] / full}
        | _versus(b, static)
        | {"curve": [c | {"macs_fraction": c["macs"] / full} for c in curve]}
    )


def _best_within(sweep: list[dict], full: float) -> float:
    """The threshold of the most accurate point of `sweep` within the budget (the cheapest
    point where none is)."""
    within = [s for s in sweep if s["macs"] <= BUDGET * full] or sweep[:1]
    return max(within, key=lambda s: s["accuracy"])["threshold"]


def _accuracy(policy: list[int], acc: torch.Tensor) -> float:
    return float(sum(acc[e, i] for i, e in enumerate(policy)) / len(policy))


def _versus(point: dict, curve: list[dict]) -> dict:
    """`point`'s accuracy against `curve`'s interpolated at its MACs (points gained)."""
    same = float(np.interp(point["macs"], [c["macs"] for c in curve],
                           [c["accuracy"] for c in curve]))  # fmt: skip
    return {"same_macs": same, "gain_points": 100 * (point["accuracy"] - same)}


def run_seed(seed: int, quick: bool = False) -> dict:
    static = []
    for depth in DEPTHS:
        m = train_spec(static_model(depth), quick, seed=seed)
        r = evaluate(m, splits(m)[1])
        static.append({"depth": depth, "accuracy": r["quality"], "macs": r["mean_macs"]})
        if depth == max(DEPTHS):
            deepest = m
    full = static[-1]["macs"]
    calm = train_spec(SPEC, quick, seed=seed)
    val, test = splits(calm)
    chosen = _best_within([at_threshold(calm, val, t) for t in GRID], full)
    fixed = fixed_exits(calm, test)
    curve = [at_threshold(calm, test, t) for t in GRID]
    out = {"static": static, "fixed": fixed,
           "curve": [c | {"macs_fraction": c["macs"] / full} for c in curve],
           "full_depth_accuracy": curve[-1]["accuracy"]}  # fmt: skip
    ps = position_stop(calm, val, test)
    out["position_stop"] = ps | _versus(ps | {"macs": ps["macs_fraction"] * full}, static)
    for key, threshold in (("chosen", chosen), ("spec", SPEC_THRESHOLD)):
        b = next(c for c in curve if c["threshold"] == threshold)
        calm.set_threshold(threshold)
        t = infer_time({"calm": calm, "static": deepest}, test.x[:256])
        vs_static, vs_fixed = _versus(b, static), _versus(b, fixed)
        out[key] = b | {
            "macs_fraction": b["macs"] / full,
            "static_same_macs": vs_static["same_macs"],
            "gain_points": vs_static["gain_points"],
            "fixed_same_macs": vs_fixed["same_macs"],
            "gain_over_fixed": vs_fixed["gain_points"],
            "time_fraction": t["calm"] / t["static"],
        }
    out["learned"] = learned_stop(train_spec(learned_spec(), quick, seed=seed), val, test, static)
    return out


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    static = [
        {"depth": d, "macs": rs[0]["static"][i]["macs"],
         "accuracy": stats([r["static"][i]["accuracy"] for r in rs])}
        for i, d in enumerate(DEPTHS)
    ]  # fmt: skip
    keys = ("accuracy", "static_same_macs", "gain_points", "fixed_same_macs",
            "gain_over_fixed", "threshold")  # fmt: skip
    points = {}
    for p in ("chosen", "spec"):
        points[p] = {k: stats([r[p][k] for r in rs]) for k in keys}
        for k in ("macs_fraction", "time_fraction"):
            points[p][k] = stats([r[p][k] for r in rs], "lower")
    ch, sp = points["chosen"], points["spec"]
    fixed = [
        {"exit": i, "macs_fraction": rs[0]["fixed"][i]["macs"] / rs[0]["static"][-1]["macs"],
         "accuracy": stats([r["fixed"][i]["accuracy"] for r in rs])}
        for i in range(len(rs[0]["fixed"]))
    ]  # fmt: skip
    exits = [r["spec"]["exit_by_position"] for r in rs]
    mean_exit = curve_stats(exits)["mean"]
    rho = spearman(list(range(len(mean_exit))), mean_exit)
    full = stats([r["full_depth_accuracy"] for r in rs])

    def gain(p: dict, key: str) -> str:
        return (f"{pm(p[key], 1, '+.2f')} points (worst seed {p[key]['worst']:+.2f}) at "
                f"{pm(p['macs_fraction'], 100, '.1f', '%')} of the MACs")  # fmt: skip

    claims = {
        "beats_static_at_half": claim(
            ch["gain_points"]["mean"] >= 3 and ch["macs_fraction"]["mean"] <= BUDGET,
            "per-token exits beat static models of the same MACs by >= 3 points (seed mean) "
            "at <= 50% of the static 4-layer model's MACs (issue 16's target)",
            gain(ch, "gain_points"),
        ),
        "beats_static": claim(
            sp["gain_points"]["mean"] >= 3,
            "at the spec's threshold (0.9) per-token exits beat static models of the same MACs "
            "by >= 3 points (seed mean)",
            gain(sp, "gain_points"),
        ),
        "beats_fixed_exit": claim(
            sp["gain_over_fixed"]["mean"] > 0,
            "at the spec's threshold, per-token exits beat the same model with every token "
            "leaving at one fixed exit, at the same MACs (CALM's static baseline; seed mean)",
            gain(sp, "gain_over_fixed"),
        ),
        "deeper_later": claim(
            rho > 0.5,
            "tokens at later positions leave at later exits (Spearman of position and the "
            "seed-mean exit at the spec's threshold > 0.5)",
            f"Spearman {rho:.2f}; exit {mean_exit[0]:.2f} at position 0, {mean_exit[-1]:.2f} at "
            f"position {len(mean_exit) - 1}",
        ),
    }
    stop = {k: stats([r["position_stop"][k] for r in rs]) for k in
            ("accuracy", "same_macs", "gain_points", "macs_fraction")}  # fmt: skip
    stop["policies"] = [r["position_stop"]["exit_by_position"] for r in rs]
    learned = {k: stats([r["learned"][k] for r in rs]) for k in
               ("accuracy", "same_macs", "gain_points", "threshold")}  # fmt: skip
    learned["macs_fraction"] = stats([r["learned"]["macs_fraction"] for r in rs], "lower")
    learned["exit_by_position"] = curve_stats([r["learned"]["exit_by_position"] for r in rs])
    claims["learned_beats_static_at_half"] = claim(
        learned["gain_points"]["mean"] >= 3 and learned["macs_fraction"]["mean"] <= BUDGET,
        "a learned per-token stop (criterion `learned`: CALM's early-exit classifier) beats "
        "static models of the same MACs by >= 3 points (seed mean) at <= 50% of the static "
        "4-layer model's MACs (issue 16's target)",
        gain(learned, "gain_points"),
    )
    return {"static": static, "fixed": fixed, "chosen": ch, "spec": sp,
            "exit_by_position": curve_stats(exits), "exit_spearman": rho,
            "full_depth_accuracy": full, "position_stop": stop, "learned": learned,
            "claims": claims}  # fmt: skip


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    full = result["static"][-1]["macs"]
    st = result["static"]
    a.errorbar([s["macs"] / full for s in st], [100 * s["accuracy"]["mean"] for s in st],
               yerr=[100 * s["accuracy"]["std"] for s in st], fmt="k.-", capsize=2,
               label="static, depth 1..4")  # fmt: skip
    for seed, run in result["runs"].items():
        a.plot([c["macs_fraction"] for c in run["curve"]],
               [100 * c["accuracy"] for c in run["curve"]], ".-", alpha=0.6,
               label=f"per-token exits, seed {seed} (threshold sweep)")  # fmt: skip
    fx = result["fixed"]
    a.errorbar([f["macs_fraction"] for f in fx], [100 * f["accuracy"]["mean"] for f in fx],
               yerr=[100 * f["accuracy"]["std"] for f in fx], fmt="s--", color="gray",
               capsize=2, label="the exit model, every token at one exit")  # fmt: skip
    for i, run in enumerate(result["runs"].values()):
        if "learned" in run:
            c = run["learned"]["curve"]
            a.plot([p["macs_fraction"] for p in c], [100 * p["accuracy"] for p in c], "x:",
                   color="C4", alpha=0.7, label="learned stop (threshold sweep)" if i == 0
                   else None)  # fmt: skip
    sp = result["spec"]
    a.errorbar([sp["macs_fraction"]["mean"]], [100 * sp["accuracy"]["mean"]],
               yerr=[100 * sp["accuracy"]["std"]], fmt="o", color="C3", capsize=2,
               label="threshold 0.9 (the spec's)")  # fmt: skip
    n = len(result["seeds"])
    label(a, "mean MACs per sequence / static 4 layers", "test accuracy per token (%)",
          f"state_tokens: CALM exits vs static depth ({n} seeds)")  # fmt: skip
    e = result["exit_by_position"]
    b.errorbar(range(len(e["mean"])), e["mean"], yerr=e["std"], fmt="o-", capsize=2)
    label(b, "position", "exit the token left at (0..3)", "exit per token by position",
          legend=False)  # fmt: skip
    save_figure(fig, path)
