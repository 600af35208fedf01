"""DeeBERT-style early exits on a transformer encoder against static encoders of equal MACs.

Claim (DeeBERT, PABEE): exits on a transformer encoder save compute at a small cost in accuracy;
at a compute budget they beat a static encoder of the same MACs, because easy sequences leave
early. Here: specs/deebert_transformer.yaml (six pre-LN layers, d = 64, an exit after each,
entropy criterion) on pointer_chase (k = 1..6 hops over eight positions; every sequence has
the same length, so the difficulty k varies and the cost does not), trained on the mean of the
exit losses; the entropy threshold calibrated on the validation split to 40% and 50% of the
full encoder's mean MACs; compared on the test split with static encoders of depth 1..6
trained alike, at the same mean MACs (interpolated).
"""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..training.calibrate import calibrate_budget  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    claim,
    curve_stats,
    label,
    pm,
    save_figure,
    spec_dict,
    splits,
    stats,
    train_spec,
    trend,
)

SPEC = "deebert_transformer"
BUDGETS = (0.4, 0.5)
DEPTHS = range(1, 7)


def static_encoder(depth: int) -> dict:
    """The same embedding and layers, `depth` of them, one head; trained alike."""
    d = copy.deepcopy(spec_dict(SPEC))
    stem, layer = d["graph"][0], d["graph"][1]["nodes"][0]
    d["name"] = f"static_encoder{depth}"
    head = d["graph"][1]["nodes"][1]["exit"]["head"]
    d["graph"] = [stem] + [dict(layer) for _ in range(depth)] + [dict(head)]
    d["train"]["stages"] = [d["train"]["stages"][0] | {"name": "static"}]
    d["train"].pop("calibrate", None)
    return d


@torch.no_grad()
def full_macs(model, data) -> float:
    """Mean MACs of the longest path over `data`, each sequence at its length."""
    counts = model.max_path_counts()
    lengths = (data.x != model.spec.input.pad_id).sum(1)
    per = {n: int(counts @ model.unit_macs("fvcore", n)) for n in lengths.unique().tolist()}
    return float(np.mean([per[n] for n in lengths.tolist()]))


def run_seed(seed: int, quick: bool = False) -> dict:
    static = []
    for depth in DEPTHS:
        m = train_spec(static_encoder(depth), quick, seed=seed)
        r = evaluate(m, splits(m)[1])
        static.append({"depth": depth, "macs": r["mean_macs"], "accuracy": r["quality"]})
    model = train_spec(SPEC, quick, seed=seed)
    val, test = splits(model)
    full_val, full_test = full_macs(model, val), full_macs(model, test)
    rows = []
    for b in BUDGETS:
        cal = calibrate_budget(model, val, b * full_val / model.static_macs())
        r = evaluate(model, test)
        same = float(np.interp(r["mean_macs"], [s["macs"] for s in static],
                               [s["accuracy"] for s in static]))  # fmt: skip
        rows.append(
            {
                "budget": b,
                "threshold": cal["value"],
                "macs_fraction": r["mean_macs"] / full_test,
                "accuracy": r["quality"],
                "static_same_macs": same,
                "gain_points": 100 * (r["quality"] - same),
            }
        )
    calibrate_budget(model, val, 0.5 * full_val / model.static_macs())
    with torch.no_grad():
        depth = (model(test.x).trace.exit + 1).float()
    ks = sorted(set(test.meta["k"].tolist()))
    by_k = [float(depth[test.meta["k"] == k].mean()) for k in ks]
    model.set_threshold(-1.0)  # nobody leaves before the last exit
    last = evaluate(model, test)
    return {"static": static, "budgets": rows, "full_accuracy": last["quality"],
            "full_test_macs": full_test, "k": ks, "exit_depth_by_k": by_k}  # fmt: skip


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    static = [
        {
            "depth": d,
            "macs": rs[0]["static"][i]["macs"],
            "accuracy": stats([r["static"][i]["accuracy"] for r in rs]),
        }
        for i, d in enumerate(DEPTHS)
    ]
    rows = []
    for i, b in enumerate(BUDGETS):
        rows.append(
            {"budget": b}
            | {
                k: stats([r["budgets"][i][k] for r in rs])
                for k in ("macs_fraction", "accuracy", "static_same_macs", "gain_points")
            }  # fmt: skip
        )
    gains = {r["budget"]: r["gain_points"] for r in rows}
    fracs = {r["budget"]: r["macs_fraction"] for r in rows}
    claims = {
        "beats_static_at_40": claim(
            gains[0.4]["mean"] >= 3,
            "exits beat static encoders of the same MACs by >= 3 points (seed mean) at 40% of "
            "the full encoder's MACs",
            f"40%: {pm(gains[0.4], 1, '+.2f')} points (worst seed {gains[0.4]['worst']:+.2f}) at "
            f"{pm(fracs[0.4], 100, '.1f', '%')}; 50%: {pm(gains[0.5], 1, '+.2f')} at "
            f"{pm(fracs[0.5], 100, '.1f', '%')}",
        ),
        "budget_met": claim(
            all(
                abs(r["budgets"][i]["macs_fraction"] - b) <= 0.05 * b
                for r in rs
                for i, b in enumerate(BUDGETS)
            ),  # fmt: skip
            "calibrated on val, test MACs within 5% of each budget, every seed",
            ", ".join(f"{b:.0%}: {pm(fracs[b], 100, '.1f', '%')}" for b in BUDGETS),
        ),
    }
    depth = [r["exit_depth_by_k"] for r in rs]
    # reported, not claimed (a claim of a >= 1 layer rise measured +0.85 on the recipe seeds,
    # see the note of issue 15): with pointer doubling the depth k hops need grows as log2(k)
    tr = trend(depth, min_rise=1.0, tol=0.25)
    return {
        "static": static,
        "budgets": rows,
        "full_accuracy": stats([r["full_accuracy"] for r in rs]),
        "k": rs[0]["k"],
        "exit_depth_by_k": curve_stats(depth),
        "exit_depth_trend": tr,
        "claims": claims,
    }


def plot(result: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    full = result["runs"][str(result["seeds"][0])]["full_test_macs"]
    st = result["static"]
    ax.errorbar([s["macs"] / full for s in st], [100 * s["accuracy"]["mean"] for s in st],
                yerr=[100 * s["accuracy"]["std"] for s in st], fmt="k.-", capsize=2,
                label="static encoders, depth 1..6")  # fmt: skip
    rows = result["budgets"]
    ax.errorbar([r["macs_fraction"]["mean"] for r in rows],
                [100 * r["accuracy"]["mean"] for r in rows],
                yerr=[100 * r["accuracy"]["std"] for r in rows], fmt="o-", capsize=2,
                label="exits (entropy), calibrated")  # fmt: skip
    label(ax, "mean MACs per sequence / full encoder", "test accuracy (%)",
          f"state_sequence: exits vs static encoders ({len(result['seeds'])} seeds)")  # fmt: skip
    save_figure(fig, path)
