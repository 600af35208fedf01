"""Composer on wide digits (Odena et al.): steering the compute by gamma at test time.

Claim: one trained controller, given the preference gamma, trades accuracy for parameters used,
above the random mixing of its modules, and sends the inputs the small module can handle (digits
in the left half it sees) to it first as gamma rises (the paper's Figure 2).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..forcing import forced  # noqa: E402
from .common import claim, label, pm, save_figure, splits, spread, stats, train_spec  # noqa: E402

GAMMAS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
#: parameter budgets (fractions of the large module's) that gamma is calibrated to on val; 50%
#: is the floor of a sensible policy (every left-half digit on the small module, every
#: right-half one on the large), so the budgets sit above it
BUDGETS = (0.55, 0.6, 0.65)


@torch.no_grad()
def run_seed(seed: int, quick: bool = False) -> dict:
    model = train_spec("composer_wide_digits", quick, seed=seed)
    val, test = splits(model)
    m = model.metalayers[0]
    cost = m.choice_params / m.choice_params.max()

    def at(data, gamma=None, force=None):
        """Accuracy, mean parameter fraction and choices on `data` at a gamma (or forced)."""
        if gamma is not None:
            model.set_gamma(gamma)
        with forced(model, metalayer=force):
            out = model(data.x)
        c = out.trace.choices[:, 0]
        acc = float((out.logits.argmax(1) == data.y).float().mean())
        return acc, float(cost[c].mean()), c

    small_acc, c_small, _ = at(test, force=[1.0, 0.0])
    large_acc, _, _ = at(test, force=[0.0, 1.0])
    left = test.meta["side"] == 0

    def point(gamma: float) -> dict:
        acc, frac, c = at(test, gamma)
        base = small_acc + (large_acc - small_acc) * (frac - c_small) / (1 - c_small)
        return {
            "gamma": gamma,
            "accuracy": acc,
            "params_fraction": frac,
            "random_mixing_accuracy": base,
            "gain_points": 100 * (acc - base),
            "left_to_small": float((c[left] == 0).float().mean()),
            "right_to_small": float((c[~left] == 0).float().mean()),
        }

    # gamma is searched within the range the controller was trained on: outside it the
    # controller extrapolates (one seed sent everything to the large module at gamma 16)
    gamma_max = m.ctl.preferences["glimpse"].gamma.train.high

    def calibrated(budget: float) -> float:
        """The smallest gamma whose mean parameter fraction on val is at most `budget`
        (bisection; the fraction falls as gamma rises), as exits are calibrated to MACs."""
        lo, hi = 0.0, gamma_max
        if at(val, lo)[1] <= budget or at(val, hi)[1] > budget:
            return lo if at(val, lo)[1] <= budget else hi
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if at(val, mid)[1] <= budget else (mid, hi)
        return hi

    points = [point(g) for g in GAMMAS]
    budgets = [{"budget": b} | point(calibrated(b)) for b in BUDGETS]
    model.set_gamma(m.ctl.preferences["glimpse"].gamma.test)
    return {
        "small_only_accuracy": small_acc,
        "large_only_accuracy": large_acc,
        "small_params_fraction": c_small,
        "points": points,
        "budgets": budgets,
    }


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    keys = ("accuracy", "params_fraction", "random_mixing_accuracy", "gain_points")
    keys += ("left_to_small", "right_to_small")

    def over(rows_of_seed: list[list[dict]], head: str) -> list[dict]:
        return [
            {head: rows[0][head]} | {k: stats([r[k] for r in rows]) for k in keys}
            for rows in zip(*rows_of_seed, strict=True)
        ]

    budgets = over([r["budgets"] for r in rs], "budget")
    # every gamma point strictly between the small module alone and the large one, every seed
    inner = [
        p
        for r in rs
        for p in r["points"] + r["budgets"]
        if r["small_params_fraction"] + 0.02 < p["params_fraction"] < 0.98
    ]
    in_range = [b for b in budgets if 0.5 - 0.02 <= b["params_fraction"]["mean"] <= 0.65 + 0.02]
    best = max(in_range, key=lambda b: b["gain_points"]["mean"], default=None)
    steers = [
        any(p["left_to_small"] >= 0.5 and p["right_to_small"] < 0.5 for p in r["points"])
        for r in rs
    ]
    return {
        "small_only_accuracy": stats([r["small_only_accuracy"] for r in rs]),
        "large_only_accuracy": stats([r["large_only_accuracy"] for r in rs]),
        "small_params_fraction": rs[0]["small_params_fraction"],
        "points": over([r["points"] for r in rs], "gamma"),
        "budgets": budgets,
        "max_gain_50_65": None if best is None else best["gain_points"],
        "claims": {
            "above_random_mixing": claim(
                bool(inner) and all(p["gain_points"] > 0 for p in inner),
                "above random mixing of the two modules at every gamma between them, every seed",
                f"{sum(p['gain_points'] > 0 for p in inner)} of {len(inner)} points; lowest "
                f"gain {min((p['gain_points'] for p in inner), default=float('nan')):+.1f} points",
            ),
            "gain_50_65": claim(
                best is not None and best["gain_points"]["mean"] >= 15,
                "with gamma calibrated on val to "
                + " / ".join(f"{b:.0%}" for b in BUDGETS)
                + " of the parameters: a seed-mean gain >= 15 points over random mixing at one "
                "of them (inside 50-65%)",
                "no budget in range"
                if best is None
                else f"{pm(best['gain_points'], 1, '+.1f')} points at "
                f"{pm(best['params_fraction'], 100, '.1f', '%')} of the parameters "
                f"(worst seed {best['gain_points']['worst']:+.1f})",
            ),
            "left_first": claim(
                all(steers),
                "as gamma rises, left-half digits go to the small module before right-half "
                "ones (a gamma with >= 50% of left and < 50% of right digits there), every seed",
                f"{sum(steers)} of {len(rs)} seeds",
            ),
        },
    }


def plot(result: dict, path) -> None:
    runs = list(result["runs"].values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(runs):
        pts = sorted(r["points"] + r["budgets"], key=lambda p: p["params_fraction"])
        a.plot(
            [p["params_fraction"] for p in pts],
            [100 * p["accuracy"] for p in pts],
            "o-",
            color="tab:blue",
            alpha=0.6,
            ms=3,
            label="Composer, gamma swept (one line per seed)" if i == 0 else None,
        )
        cs = r["small_params_fraction"]
        a.plot(
            [cs, 1.0],
            [100 * r["small_only_accuracy"], 100 * r["large_only_accuracy"]],
            "k--",
            alpha=0.6,
            label="random mixing" if i == 0 else None,
        )
    for bud in result["budgets"]:
        a.axvline(bud["budget"], color="tab:green", alpha=0.3, lw=1)
    label(
        a,
        "mean parameters used / large module's",
        "test accuracy (%)",
        f"accuracy versus parameters ({len(runs)} seeds; green: calibrated budgets)",
    )
    g = [p["gamma"] for p in runs[0]["points"]]
    spread(b, g, [[100 * p["left_to_small"] for p in r["points"]] for r in runs], "o-", "left half")
    spread(
        b, g, [[100 * p["right_to_small"] for p in r["points"]] for r in runs], "s-", "right half"
    )
    label(
        b,
        "gamma (test-time preference)",
        "sent to the small module (%)",
        "which inputs go to the small (left-glimpse) module",
    )
    save_figure(fig, path)
