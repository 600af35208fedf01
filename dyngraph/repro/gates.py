"""SkipNet (feed-forward and recurrent gates) and BlockDrop on state_tracking.

Claim (SkipNet, BlockDrop): a network that skips blocks per input keeps its accuracy at a
fraction of the compute, and spends more blocks on harder inputs. Here: 8 gated residual
blocks; at <= 60% of the longest path's MACs (gate threshold calibrated on validation when the
trained model uses more), test accuracy against static networks of depth 1..8 at the same MACs,
and blocks run versus the difficulty k.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.calibrate import calibrate_budget  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    DOCS,
    interpolate,
    label,
    save_figure,
    save_result,
    spearman,
    splits,
    static_baselines,
    train_spec,
)

BUDGET = 0.6


@torch.no_grad()
def run_one(name: str, quick: bool, static: list[dict]) -> dict:
    model = train_spec(name, quick)
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


def run(quick: bool = False, only: str | None = None) -> dict:
    """All three, or with `only` one spec, updating the saved results."""
    static = static_baselines(quick)
    saved = DOCS / ("gates_quick.json" if quick else "gates.json")
    result = json.loads(saved.read_text()) if only and saved.exists() else {}
    result["static"] = static
    for name in ("skipnet_ff", "skipnet_rnn", "blockdrop"):
        if only in (None, name):
            result[name] = run_one(name, quick, static)
    save_result("gates" + ("_quick" if quick else ""), result)
    plot(result, DOCS / ("gates_quick.png" if quick else "gates.png"))
    return result


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    st = result["static"]
    a.plot(
        [r["macs"] for r in st], [100 * r["accuracy"] for r in st], "k.-", label="static depth 1..8"
    )
    for name, m in (("skipnet_ff", "o"), ("skipnet_rnn", "s"), ("blockdrop", "^")):
        r = result[name]
        a.plot([r["mean_macs"]], [100 * r["accuracy"]], m, markersize=9, label=name)
        b.plot(r["k"], r["blocks_by_k"], m + "-", label=name)
    label(
        a,
        "mean MACs per input",
        "test accuracy (%)",
        "state_tracking: skip gates vs static networks",
    )
    label(b, "difficulty k", "blocks run (of 8)", "blocks executed rise with difficulty")
    save_figure(fig, path)
