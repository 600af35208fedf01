"""Early exits on state_tracking (MSDNet-style and SCAN-style) against static networks.

Claim (MSDNet, SCAN): a multi-exit network at a compute budget beats a static network of the
same cost, because easy inputs leave early. Here: 8 residual blocks with an exit after each,
trained on the mean of the exit losses (and, SCAN, self-distillation), calibrated on the
validation split to 40% / 50% / 60% of the longest path's MACs, compared on the test split with
static networks of depth 1..8 trained alike, at the same MACs (interpolated between depths).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..training.calibrate import calibrate_budget, fit_temperatures  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    claim,
    curve_stats,
    interpolate,
    label,
    pm,
    save_figure,
    spec_dict,
    splits,
    static_baselines,
    stats,
    train_spec,
    trend,
)

BUDGETS = (0.4, 0.5, 0.6)
SPECS = ("msdnet_early_exit", "scan_early_exit")


def run_one(name: str, quick: bool, static: list[dict], seed: int) -> dict:
    model = train_spec(name, quick, seed=seed)
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


def run_seed(seed: int, quick: bool = False) -> dict:
    static = static_baselines(quick)
    return {name: run_one(name, quick, static, seed) for name in SPECS} | {
        "digits": digits_sanity(quick, seed)
    }


def digits_sanity(quick: bool, seed: int) -> dict:
    """On digits: the multi-exit net within 1 point of its full depth at <= 50% of its MACs."""
    d = spec_dict("digits_early_exit")
    d["name"] = "digits_early_exit_trained"
    d["train"] = {
        "data": {"name": "digits"},
        "batch_size": 64,
        "stages": [
            {"name": "multi_exit", "epochs": 40, "optimizer": {"type": "adam", "lr": 1.0e-3}}
        ],
    }
    model = train_spec(d, quick, seed=seed)
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


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    result: dict = {"static": static_baselines(quick)}
    claims = {}
    for name in SPECS:
        one = [r[name] for r in rs]
        rows = []
        for per_seed in zip(*[o["budgets"] for o in one], strict=True):
            row = {"budget": per_seed[0]["budget"], "of": per_seed[0]["of"]}
            for k in ("test_backbone_fraction", "test_macs_fraction", "accuracy"):
                row[k] = stats([p[k] for p in per_seed])
            row["static_accuracy_same_macs"] = stats(
                [p["static_accuracy_same_macs"] for p in per_seed]
            )
            row["gain_points"] = stats([p["gain_points"] for p in per_seed])
            rows.append(row)
        depth = [o["mean_exit_depth_by_k"] for o in one]
        tr = trend(depth, min_rise=1.0, tol=0.25)
        result[name] = {
            "budgets": rows,
            "k": one[0]["k"],
            "mean_exit_depth_by_k": curve_stats(depth),
            "trend": tr,
            "last_exit_accuracy": stats([o["last_exit_accuracy"] for o in one]),
            "full_macs": one[0]["full_macs"],
            "backbone_macs": one[0]["backbone_macs"],
        }
        gains = {r["budget"]: r["gain_points"] for r in rows if r["of"] == "backbone"}
        met = [
            abs(p["test_macs_fraction"] - p["budget"]) <= 0.05 * p["budget"]
            for o in one
            for p in o["budgets"]
            if p["of"] == "longest_path"
        ]
        claims[f"{name}_beats_static"] = claim(
            all(gains[b]["mean"] >= 3 for b in (0.4, 0.5)),
            f"{name} beats static networks of the same MACs by >= 3 points (seed mean) at 40% "
            "and 50% of the backbone's MACs",
            "; ".join(
                f"{b:.0%}: {pm(gains[b], 1, '+.2f')} (worst seed {gains[b]['worst']:+.2f})"
                for b in (0.4, 0.5)
            ),
        )
        claims[f"{name}_budget_met"] = claim(
            all(met),
            f"{name}: calibrated on val, test MACs within 5% of each budget, every seed",
            f"{sum(met)} of {len(met)}",
        )
        claims[f"{name}_deeper_when_harder"] = claim(
            tr["holds"],
            f"{name}: harder inputs leave later: on the seed-mean exit depth by k, the upper "
            "half >= 1 block above the lower half, no step down > 0.25",
            f"rise {tr['rise']:+.2f} blocks, largest step down {tr['largest_drop']:.2f}, "
            f"{tr['seeds_rising']} of {len(rs)} seeds rising",
        )
    dg = [r["digits"] for r in rs]
    loss = stats([100 * (d["full_accuracy"] - d["accuracy_at_half"]) for d in dg], "lower")
    macs = stats([d["macs_fraction"] for d in dg], "lower")
    result["digits"] = {
        "full_accuracy": stats([d["full_accuracy"] for d in dg]),
        "accuracy_at_half": stats([d["accuracy_at_half"] for d in dg]),
        "loss_points": loss,
        "macs_fraction": macs,
    }
    claims["digits_half"] = claim(
        loss["mean"] <= 1.0 and macs["mean"] <= 0.5,
        "digits: within 1 point of full depth (seed mean) at <= 50% of the MACs",
        f"{pm(loss, 1, '.2f')} points lost at {pm(macs, 100, '.1f', '%')} of the MACs",
    )
    result["claims"] = claims
    return result


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    st = result["static"]
    full = result["msdnet_early_exit"]["full_macs"]
    a.errorbar(
        [r["macs"] / full for r in st],
        [100 * r["accuracy"] for r in st],
        yerr=[100 * r["accuracy_std"] for r in st],
        fmt="k.-",
        capsize=2,
        label="static depth 1..8",
    )
    for name, style in (("msdnet_early_exit", "o-"), ("scan_early_exit", "s--")):
        rows = sorted(result[name]["budgets"], key=lambda r: r["test_macs_fraction"]["mean"])
        a.errorbar(
            [r["test_macs_fraction"]["mean"] for r in rows],
            [100 * r["accuracy"]["mean"] for r in rows],
            yerr=[100 * r["accuracy"]["std"] for r in rows],
            fmt=style,
            capsize=2,
            label=name,
        )
    label(
        a,
        "mean MACs per input / longest path",
        "test accuracy (%)",
        f"state_tracking: early exits vs static networks ({len(result['seeds'])} seeds)",
    )
    for name, dx in (("msdnet_early_exit", -0.2), ("scan_early_exit", 0.2)):
        r = result[name]
        d = r["mean_exit_depth_by_k"]
        b.bar(np.array(r["k"]) + dx, d["mean"], yerr=d["std"], width=0.4, capsize=2, label=name)
    label(
        b,
        "difficulty k (steps of the walk)",
        "mean exit depth (1..8) at the 50% budget",
        "harder inputs leave later (mean ± std over seeds)",
    )
    save_figure(fig, path)
