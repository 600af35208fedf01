"""Early exits on state_tracking (MSDNet-style and SCAN-style) against static networks.

Claim (MSDNet, SCAN): a multi-exit network at a compute budget beats a static network of the
same cost, because easy inputs leave early. Here: 8 residual blocks with an exit after each,
trained on the mean of the exit losses (and, SCAN, self-distillation), calibrated on the
validation split to 40% / 50% / 60% of the longest path's MACs, compared on the test split with
static networks of depth 1..8 trained alike, at the same MACs (interpolated between depths).
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..training.calibrate import calibrate_budget, fit_temperatures  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    DOCS,
    interpolate,
    label,
    save_figure,
    save_result,
    splits,
    static_baselines,
    train_spec,
)

BUDGETS = (0.4, 0.5, 0.6)


def run_one(name: str, quick: bool, static: list[dict]) -> dict:
    model = train_spec(name, quick)
    val, test = splits(model)
    temps = fit_temperatures(model, val)
    rows = []
    backbone = model.static_macs(decisions=False)
    full = model.static_macs()
    # budgets as fractions of the longest path (with every exit head), then of the static backbone
    for b, of in [(b, "longest_path") for b in BUDGETS] + [(b, "backbone") for b in BUDGETS]:
        cal = calibrate_budget(model, val, b if of == "longest_path" else b * backbone / full)
        r = evaluate(model, test)
        rows.append(
            {
                "budget": b,
                "of": of,
                "test_backbone_fraction": r["mean_macs"] / backbone,
                "threshold": cal["value"],
                "test_macs_fraction": r["macs_fraction"],
                "test_macs": r["mean_macs"],
                "accuracy": r["quality"],
                "static_accuracy_same_macs": interpolate(static, r["mean_macs"]),
                "gain_points": 100 * (r["quality"] - interpolate(static, r["mean_macs"])),
            }
        )
    # exit depth versus difficulty k, at the 50% budget
    calibrate_budget(model, val, 0.5)
    k, depth = _exit_depth_by_k(model, test)
    model.set_threshold(1.01)
    last = evaluate(model, test)
    return {
        "spec": name,
        "temperatures": temps,
        "budgets": rows,
        "mean_exit_depth_by_k": depth,
        "k": k,
        "last_exit_accuracy": last["quality"],
        "full_macs": full,
        "backbone_macs": backbone,
    }


@torch.no_grad()
def _exit_depth_by_k(model, test) -> tuple[list[int], list[float]]:
    out = model(test.x)
    depth = (out.trace.exit + 1).float()
    ks = sorted(set(test.meta["k"].tolist()))
    return ks, [float(depth[test.meta["k"] == k].mean()) for k in ks]


def run(quick: bool = False, only: str | None = None) -> dict:
    """All of it, or with `only` one of msdnet_early_exit / scan_early_exit / digits, updating the
    saved results."""
    static = static_baselines(quick)
    saved = DOCS / ("early_exit_quick.json" if quick else "early_exit.json")
    result = json.loads(saved.read_text()) if only and saved.exists() else {}
    result["static"] = static
    for name in ("msdnet_early_exit", "scan_early_exit"):
        if only in (None, name):
            result[name] = run_one(name, quick, static)
    if only in (None, "digits"):
        result["digits"] = digits_sanity(quick)
    save_result("early_exit" + ("_quick" if quick else ""), result)
    plot(result, DOCS / ("early_exit_quick.png" if quick else "early_exit.png"))
    return result


def digits_sanity(quick: bool) -> dict:
    """On digits: the multi-exit net within 1 point of its full depth at <= 50% of its MACs."""
    from .common import spec_dict

    d = spec_dict("digits_early_exit")
    d["name"] = "digits_early_exit_trained"
    d["train"] = {
        "data": {"name": "digits"},
        "batch_size": 64,
        "stages": [
            {"name": "multi_exit", "epochs": 40, "optimizer": {"type": "adam", "lr": 1.0e-3}}
        ],
    }
    model = train_spec(d, quick)
    val, test = splits(model)
    fit_temperatures(model, val)
    model.set_threshold(1.01)
    full = evaluate(model, test)
    calibrate_budget(model, val, 0.45)  # a margin: the budget is met on val, checked on test
    half = evaluate(model, test)
    return {
        "full_accuracy": full["quality"],
        "accuracy_at_half": half["quality"],
        "macs_fraction": half["macs_fraction"],
    }


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    st = result["static"]
    full = result["msdnet_early_exit"]["full_macs"]
    a.plot(
        [r["macs"] / full for r in st],
        [100 * r["accuracy"] for r in st],
        "k.-",
        label="static depth 1..8",
    )
    for name, style in (("msdnet_early_exit", "o-"), ("scan_early_exit", "s--")):
        rows = sorted(result[name]["budgets"], key=lambda r: r["test_macs"])
        a.plot(
            [r["test_macs_fraction"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            style,
            label=name,
        )
    label(
        a,
        "mean MACs per input / longest path",
        "test accuracy (%)",
        "state_tracking: early exits vs static networks",
    )
    r = result["msdnet_early_exit"]
    b.bar(np.array(r["k"]) - 0.2, r["mean_exit_depth_by_k"], width=0.4, label="msdnet_early_exit")
    r = result["scan_early_exit"]
    b.bar(np.array(r["k"]) + 0.2, r["mean_exit_depth_by_k"], width=0.4, label="scan_early_exit")
    label(
        b,
        "difficulty k (steps of the walk)",
        "mean exit depth (1..8) at the 50% budget",
        "harder inputs leave later",
    )
    save_figure(fig, path)
