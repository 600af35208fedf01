"""Learning to Stop on sparse recovery (Chen et al.): LISTA with a learned stop policy.

Claim: stopping each input at its own depth gives a lower error than stopping every input at the
same depth, at equal mean depth. Here: 16 unshared residual LISTA layers, A 64x128, support
probability 0.1, SNR 20 dB; stage I (oracle-weighted per-layer loss), stage II (the stop policy
imitates the oracle). The policy's threshold is swept; at each mean depth its NMSE is compared
with the same network cut at that fixed depth (interpolated between depths).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..data.sets import nmse_db  # noqa: E402
from .common import claim, curve_stats, label, pm, save_figure, splits, stats, train_spec  # noqa: E402

THRESHOLDS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]


@torch.no_grad()
def run_seed(seed: int, quick: bool = False) -> dict:
    model = train_spec("l2s_lista", quick, seed=seed)
    _, test = splits(model)
    h = model.haltings[0]
    model.train()
    states = model(test.x, mode="train").extras["halting"][0]["states"]
    model.eval()
    fixed = [nmse_db(s, test.y) for s in states]  # the network cut at depth t = 1..T
    depths = np.arange(1, len(fixed) + 1)
    curve = []
    old = h.threshold
    for t in THRESHOLDS:
        h.threshold = t
        out = model(test.x)
        d = float(out.trace.steps[:, 0].float().mean())
        n = nmse_db(out.logits, test.y)
        same = float(np.interp(d, depths, fixed))
        curve.append(
            {
                "threshold": t,
                "mean_depth": d,
                "nmse_db": n,
                "fixed_depth_nmse_db": same,
                "gain_db": same - n,
            }
        )
    h.threshold = old
    return {"fixed_depth_nmse_db": fixed, "policy": curve}


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    layers = len(rs[0]["fixed_depth_nmse_db"])
    policy = []
    for i, t in enumerate(THRESHOLDS):
        pts = [r["policy"][i] for r in rs]
        policy.append(
            {"threshold": t}
            | {
                k: stats([p[k] for p in pts])
                for k in ("mean_depth", "nmse_db", "fixed_depth_nmse_db", "gain_db")
            }
        )
    # depth budgets strictly inside (2, T - 1) layers where the policy gains on average
    inner = [p for p in policy if 2 <= p["mean_depth"]["mean"] <= layers - 1]
    gaining = [p for p in inner if p["gain_db"]["mean"] >= 0.1]
    return {
        "fixed_depth_nmse_db": curve_stats([r["fixed_depth_nmse_db"] for r in rs]),
        "policy": policy,
        "budgets_with_gain_0.1dB": len(gaining),
        "claims": {
            "beats_fixed_depth": claim(
                len(gaining) >= 2,
                "stopping per input beats a fixed depth at equal mean depth: a seed-mean gain "
                ">= 0.1 dB at >= 2 thresholds whose mean depth is inside 2..15 layers",
                f"{len(gaining)} thresholds: "
                + "; ".join(
                    f"{p['threshold']:g} (depth {p['mean_depth']['mean']:.1f}) {pm(p['gain_db'])} dB"
                    for p in gaining
                ),
            ),
        },
    }


def plot(result: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    f = result["fixed_depth_nmse_db"]
    depths = np.arange(1, len(f["mean"]) + 1)
    ax.errorbar(
        depths,
        f["mean"],
        yerr=f["std"],
        fmt="k.-",
        capsize=2,
        label="same network cut at a fixed depth",
    )
    p = result["policy"]
    ax.errorbar(
        [c["mean_depth"]["mean"] for c in p],
        [c["nmse_db"]["mean"] for c in p],
        xerr=[c["mean_depth"]["std"] for c in p],
        yerr=[c["nmse_db"]["std"] for c in p],
        fmt="o-",
        capsize=2,
        label="learned stop policy (threshold swept)",
    )
    label(
        ax,
        "mean depth (LISTA layers run)",
        "test NMSE (dB)",
        f"L2S on sparse recovery (64x128, SNR 20 dB), mean ± std of {len(result['seeds'])} seeds",
    )
    save_figure(fig, path)
