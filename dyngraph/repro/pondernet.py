"""PonderNet on parity: accuracy and mean steps over the seeds, steps by difficulty (reported)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .act import ponder_on_parity  # noqa: E402
from .common import (  # noqa: E402
    claim,
    curve_stats,
    pm,
    save_figure,
    spread,
    stats,
    train_spec,
)


def run_seed(seed: int, quick: bool = False) -> dict:
    return ponder_on_parity(train_spec("pondernet_parity", quick, seed=seed))


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    acc = stats([r["accuracy"] for r in rs])
    steps = stats([r["mean_steps"] for r in rs], "lower")
    return {
        "accuracy": acc,
        "mean_steps": steps,
        "spearman": stats([r["spearman"] for r in rs]),
        "nonzero": rs[0]["nonzero"],
        "steps_by_nonzero": curve_stats([r["steps_by_nonzero"] for r in rs]),
        "claims": {
            "solves": claim(
                acc["mean"] >= 0.9,
                "PonderNet solves 8-bit parity: mean test accuracy >= 90%",
                f"{pm(acc, 100, '.2f', '%')} (worst seed {100 * acc['worst']:.2f}%)",
            ),
            "halts": claim(
                all(1 <= v <= 20 for v in steps["values"]),
                "it halts inside its 1..20 steps on every seed",
                f"mean steps {pm(steps)} (seeds: {', '.join(f'{v:.2f}' for v in steps['values'])})",
            ),
        },
    }


def plot(result: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ks = result["nonzero"]
    spread(ax, ks, [r["steps_by_nonzero"] for r in result["runs"].values()])
    ax.set_xlabel("number of non-zero input bits")
    ax.set_ylabel("mean steps (halting at the median)")
    ax.set_title(
        f"PonderNet parity n=8, {len(result['seeds'])} seeds: accuracy "
        f"{pm(result['accuracy'], 100, '.1f', '%')}, {pm(result['mean_steps'])} steps",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
