"""SkipNet (feed-forward and recurrent gates) and BlockDrop on state_tracking.

Claim (SkipNet, BlockDrop): a network that skips blocks per input keeps its accuracy at a
fraction of the compute, and spends more blocks on harder inputs. Here: 8 gated residual
blocks; at <= 60% of the longest path's MACs (gate threshold calibrated on validation when the
trained model uses more), test accuracy against static networks of depth 1..8 at the same MACs,
and blocks run versus the difficulty k.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.calibrate import calibrate_budget  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    claim,
    curve_stats,
    interpolate,
    label,
    pm,
    save_figure,
    spearman,
    splits,
    spread,
    static_baselines,
    stats,
    train_spec,
    trend,
)

BUDGET = 0.6
SPECS = ("skipnet_ff", "skipnet_rnn", "blockdrop")


@torch.no_grad()
def run_one(name: str, quick: bool, static: list[dict], seed: int) -> dict:
    model = train_spec(name, quick, seed=seed)
    val, test = splits(model)
    as_trained = evaluate(model, test)
    cal = None
    if as_trained["macs_fraction"] > BUDGET:
        cal = calibrate_budget(model, val, BUDGET)
    r = evaluate(model, test)
    out = model(test.x)
    blocks = (out.trace.gates == 1).sum(1).float()
    ks = sorted(set(test.meta["k"].tolist()))
    by_k = [float(blocks[test.meta["k"] == k].mean()) for k in ks]
    static_acc = interpolate(static, r["mean_macs"])
    return {
        "spec": name,
        "as_trained": {
            "accuracy": as_trained["quality"],
            "macs_fraction": as_trained["macs_fraction"],
        },
        "calibrated": cal,
        "accuracy": r["quality"],
        "macs_fraction": r["macs_fraction"],
        "mean_macs": r["mean_macs"],
        "static_accuracy_same_macs": static_acc,
        "gain_points": 100 * (r["quality"] - static_acc),
        "k": ks,
        "blocks_by_k": by_k,
        "spearman_blocks_k": spearman(blocks.numpy(), test.meta["k"].numpy()),
    }


def run_seed(seed: int, quick: bool = False) -> dict:
    static = static_baselines(quick)
    return {name: run_one(name, quick, static, seed) for name in SPECS}


#: the claimed margin against static networks of the same MACs, in points (seed mean)
MARGIN = {"skipnet_ff": -1.0, "skipnet_rnn": -1.0, "blockdrop": -1.0}


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    result: dict = {"static": static_baselines(quick)}
    claims = {}
    for name in SPECS:
        one = [r[name] for r in rs]
        g = {
            k: stats([o[k] for o in one], "lower" if k == "macs_fraction" else "higher")
            for k in (
                "accuracy",
                "macs_fraction",
                "mean_macs",
                "static_accuracy_same_macs",
                "gain_points",
                "spearman_blocks_k",
            )
        }
        g["as_trained_accuracy"] = stats([o["as_trained"]["accuracy"] for o in one])
        g["as_trained_macs_fraction"] = stats([o["as_trained"]["macs_fraction"] for o in one])
        g["calibrated_seeds"] = sum(o["calibrated"] is not None for o in one)
        by_k = [o["blocks_by_k"] for o in one]
        g["k"], g["blocks_by_k"] = one[0]["k"], curve_stats(by_k)
        g["trend"] = tr = trend(by_k, min_rise=1.0, tol=0.25)
        result[name] = g
        gain, macs = g["gain_points"], g["macs_fraction"]
        claims[f"{name}_matches_static"] = claim(
            gain["mean"] >= MARGIN[name] and macs["mean"] <= BUDGET + 0.03,
            f"{name} at <= {BUDGET:.0%} of the MACs (seed mean, 3% slack): test accuracy within "
            f"{-MARGIN[name]:g} point of static networks of the same MACs (seed mean)",
            f"{pm(gain, 1, '+.2f')} points (worst seed {gain['worst']:+.2f}) at "
            f"{pm(macs, 100, '.1f', '%')} of the MACs",
        )
        claims[f"{name}_more_blocks_when_harder"] = claim(
            tr["holds"],
            f"{name}: harder inputs run more blocks: on the seed-mean blocks by k, the upper "
            "half >= 1 block above the lower half, no step down > 0.25",
            f"rise {tr['rise']:+.2f} blocks, largest step down {tr['largest_drop']:.2f}, "
            f"{tr['seeds_rising']} of {len(rs)} seeds rising",
        )
    result["claims"] = claims
    return result


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    st = result["static"]
    a.errorbar(
        [r["macs"] for r in st],
        [100 * r["accuracy"] for r in st],
        yerr=[100 * r["accuracy_std"] for r in st],
        fmt="k.-",
        capsize=2,
        label="static depth 1..8",
    )
    for name, m in (("skipnet_ff", "o"), ("skipnet_rnn", "s"), ("blockdrop", "^")):
        g = result[name]
        pts = list(result["runs"].values())
        line = a.plot(
            [p[name]["mean_macs"] for p in pts],
            [100 * p[name]["accuracy"] for p in pts],
            m,
            alpha=0.35,
        )[0]
        a.errorbar(
            [g["mean_macs"]["mean"]],
            [100 * g["accuracy"]["mean"]],
            xerr=[g["mean_macs"]["std"]],
            yerr=[100 * g["accuracy"]["std"]],
            fmt=m,
            markersize=9,
            capsize=3,
            color=line.get_color(),
            label=f"{name} (seeds faint)",
        )
        spread(b, g["k"], [p[name]["blocks_by_k"] for p in pts], m + "-", name)
    label(
        a,
        "mean MACs per input",
        "test accuracy (%)",
        "state_tracking: skip gates vs static networks",
    )
    label(b, "difficulty k", "blocks run (of 8)", "blocks executed rise with difficulty")
    save_figure(fig, path)
