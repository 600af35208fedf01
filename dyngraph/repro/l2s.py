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
from .common import DOCS, label, save_figure, save_result, splits, train_spec  # noqa: E402

THRESHOLDS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]


@torch.no_grad()
def run(quick: bool = False) -> dict:
    model = train_spec("l2s_lista", quick)
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
    inner = [c for c in curve if 2 <= c["mean_depth"] <= len(fixed) - 1]
    result = {
        "fixed_depth_nmse_db": fixed,
        "policy": curve,
        "budgets_with_gain_0.1dB": sum(c["gain_db"] >= 0.1 for c in inner),
    }
    save_result("l2s" + ("_quick" if quick else ""), result)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(depths, fixed, "k.-", label="same network cut at a fixed depth")
    ax.plot(
        [c["mean_depth"] for c in curve],
        [c["nmse_db"] for c in curve],
        "o-",
        label="learned stop policy (threshold swept)",
    )
    label(
        ax,
        "mean depth (LISTA layers run)",
        "test NMSE (dB)",
        "L2S on sparse recovery (64x128, SNR 20 dB)",
    )
    save_figure(fig, DOCS / ("l2s_quick.png" if quick else "l2s.png"))
    return result
