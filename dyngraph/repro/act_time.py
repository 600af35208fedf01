"""Adaptive Computation Time through time on Graves' addition task (Graves, 2016, §3.3).

Claims: an RNN that ponders at every step of a sequence, halting each step on its own, is at
least as accurate as the same RNN taking a fixed number of steps per position at the same mean
steps, and it ponders longer where a step is harder. Here: specs/act_addition.yaml (numbers of
one digit as ids, k = 1..5 of them, the label at each position the sum so far; a GRU cell of
128 ponders up to 8 steps per position, tau = 1e-3, 3,000 steps), against the same network with
1, 2, 4 and 8 fixed steps per position (its halting unit biased to never halt and no ponder
cost), trained alike; accuracy interpolated at ACT's mean steps per position. A step's
difficulty: the carries so far (the tens of the running sum).
"""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    claim,
    label,
    pm,
    save_figure,
    spec_dict,
    splits,
    spread,
    stats,
    steps_by,
    train_spec,
)

SPEC = "act_addition"
FIXED = (1, 2, 4, 8)


def fixed_spec(n: int) -> dict:
    """The same network taking exactly `n` steps at every position."""
    d = copy.deepcopy(spec_dict(SPEC))
    h = d["graph"][1]["halting"]
    h.update(max_steps=n, ponder_cost=0.0, unit={"type": "act_unit", "bias": -30.0})
    d["name"] = f"act_addition_fixed{n}"
    return d


@torch.no_grad()
def ponder(model, test) -> dict:
    """Accuracy, mean steps per position and steps by difficulty (carries so far)."""
    steps = model(test.x).trace.tokens["halting 0"]
    valid = test.x != 0
    nums = (test.x - 1).clamp_min(0) * valid
    carries = nums.cumsum(1) // 10
    return {
        "accuracy": evaluate(model, test)["quality"],
        **steps_by(steps[valid], carries[valid], "carries"),
    }


def run_seed(seed: int, quick: bool = False) -> dict:
    fixed = []
    for n in FIXED:
        m = train_spec(fixed_spec(n), quick, seed=seed)
        fixed.append({"steps": n, **ponder(m, splits(m)[1])})
    model = train_spec(SPEC, quick, seed=seed)
    r = ponder(model, splits(model)[1])
    same = float(np.interp(r["mean_steps"], [f["mean_steps"] for f in fixed],
                           [f["accuracy"] for f in fixed]))  # fmt: skip
    return {"fixed": fixed, "act": r | {"fixed_same_steps": same,
            "gain_points": 100 * (r["accuracy"] - same)}}  # fmt: skip


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    act = {k: stats([r["act"][k] for r in rs])
           for k in ("accuracy", "mean_steps", "fixed_same_steps", "gain_points", "spearman")}  # fmt: skip
    fixed = [
        {"steps": n, "accuracy": stats([r["fixed"][i]["accuracy"] for r in rs])}
        for i, n in enumerate(FIXED)
    ]
    claims = {
        "beats_fixed": claim(
            act["gain_points"]["mean"] >= 0,
            "ACT through time is at least as accurate as fixed steps per position at the same "
            "mean steps (seed mean)",
            f"{pm(act['gain_points'], 1, '+.2f')} points (worst seed "
            f"{act['gain_points']['worst']:+.2f}): {pm(act['accuracy'], 100, '.2f', '%')} at "
            f"{pm(act['mean_steps'], 1, '.2f')} steps per position",
        ),
        "ponder_follows_difficulty": claim(
            act["spearman"]["mean"] > 0.5,
            "each position ponders longer the more carries its sum has made (Spearman > 0.5, "
            "seed mean)",
            f"Spearman {pm(act['spearman'], 1, '.2f')} (worst seed {act['spearman']['worst']:.2f})",
        ),
    }
    return {"act": act, "fixed": fixed, "claims": claims}


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    f = result["fixed"]
    a.errorbar([x["steps"] for x in f], [100 * x["accuracy"]["mean"] for x in f],
               yerr=[100 * x["accuracy"]["std"] for x in f], fmt="k.-", capsize=2,
               label="fixed steps per position")  # fmt: skip
    act = result["act"]
    a.errorbar([act["mean_steps"]["mean"]], [100 * act["accuracy"]["mean"]],
               xerr=[act["mean_steps"]["std"]], yerr=[100 * act["accuracy"]["std"]], fmt="o",
               capsize=2, label="ACT through time")  # fmt: skip
    n = len(result["seeds"])
    label(a, "mean steps per position", "test accuracy per position (%)",
          f"addition: ACT vs fixed steps ({n} seeds)")  # fmt: skip
    runs = list(result["runs"].values())
    levels = min((r["act"]["carries"] for r in runs), key=len)
    curves = [r["act"]["steps_by_carries"][: len(levels)] for r in runs]
    spread(b, levels, curves)
    label(b, "carries so far", "mean ponder steps", "ponder steps by difficulty")
    save_figure(fig, path)
