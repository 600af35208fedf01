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

from .common import DOCS, label, save_figure, save_result, splits, train_spec  # noqa: E402

GAMMAS = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0]


@torch.no_grad()
def run(quick: bool = False) -> dict:
    model = train_spec("composer_wide_digits", quick)
    _, test = splits(model)
    m = model.metalayers[0]
    cost = (m.choice_params / m.choice_params.max()).tolist()
    left = test.meta["side"] == 0

    def at(force=None, gamma=None):
        m.force = force
        if gamma is not None:
            model.set_gamma(gamma)
        out = model(test.x)
        c = out.trace.choices[:, 0]
        acc = float((out.logits.argmax(1) == test.y).float().mean())
        return acc, float(torch.tensor(cost)[c].mean()), c

    small_acc, c_small, _ = at(force=[1.0, 0.0])
    large_acc, _, _ = at(force=[0.0, 1.0])
    m.force = None
    points = []
    for g in GAMMAS:
        acc, frac, c = at(gamma=g)
        base = small_acc + (large_acc - small_acc) * (frac - c_small) / (1 - c_small)
        points.append(
            {
                "gamma": g,
                "accuracy": acc,
                "params_fraction": frac,
                "random_mixing_accuracy": base,
                "gain_points": 100 * (acc - base),
                "left_to_small": float((c[left] == 0).float().mean()),
                "right_to_small": float((c[~left] == 0).float().mean()),
            }
        )
    model.set_gamma(model.metalayers[0].ctl.preferences["glimpse"].gamma.test)
    inner = [p for p in points if 0.5 <= p["params_fraction"] <= 0.65]
    result = {
        "small_only_accuracy": small_acc,
        "large_only_accuracy": large_acc,
        "small_params_fraction": c_small,
        "points": points,
        "max_gain_50_65": max((p["gain_points"] for p in inner), default=None),
    }
    save_result("composer" + ("_quick" if quick else ""), result)
    plot(result, DOCS / ("composer_quick.png" if quick else "composer.png"))
    return result


def plot(result: dict, path) -> None:
    pts = result["points"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(
        [p["params_fraction"] for p in pts],
        [100 * p["accuracy"] for p in pts],
        "o-",
        label="Composer, gamma swept",
    )
    cs = result["small_params_fraction"]
    a.plot(
        [cs, 1.0],
        [100 * result["small_only_accuracy"], 100 * result["large_only_accuracy"]],
        "k--",
        label="random mixing",
    )
    label(
        a,
        "mean parameters used / large module's",
        "test accuracy (%)",
        "accuracy versus parameters (one model)",
    )
    g = [p["gamma"] for p in pts]
    b.plot(g, [100 * p["left_to_small"] for p in pts], "o-", label="left-half digits")
    b.plot(g, [100 * p["right_to_small"] for p in pts], "s-", label="right-half digits")
    label(
        b,
        "gamma (test-time preference)",
        "sent to the small module (%)",
        "which inputs go to the small (left-glimpse) module",
    )
    save_figure(fig, path)
