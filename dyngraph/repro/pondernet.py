"""PonderNet on parity: accuracy and mean steps (reported)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.evaluate import evaluate  # noqa: E402
from .common import DOCS, save_figure, save_result, spearman, splits, train_spec  # noqa: E402


@torch.no_grad()
def run(quick: bool = False) -> dict:
    model = train_spec("pondernet_parity", quick)
    _, test = splits(model)
    r = evaluate(model, test)
    steps = model(test.x).trace.steps[:, 0].float()
    nz = test.meta["nonzero"]
    ks = sorted(set(nz.tolist()))
    by_k = [float(steps[nz == k].mean()) for k in ks]
    result = {
        "accuracy": r["quality"],
        "mean_steps": float(steps.mean()),
        "nonzero": ks,
        "steps_by_nonzero": by_k,
        "spearman": spearman(steps.numpy(), nz.numpy()),
    }
    save_result("pondernet" + ("_quick" if quick else ""), result)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ks, by_k, "o-")
    ax.set_xlabel("number of non-zero input bits")
    ax.set_ylabel("mean steps (halting at the median)")
    ax.set_title(
        f"PonderNet parity n=8: accuracy {100 * r['quality']:.1f}%, mean {result['mean_steps']:.2f} steps"
    )
    ax.grid(alpha=0.3)
    save_figure(fig, DOCS / ("pondernet_quick.png" if quick else "pondernet.png"))
    return result
