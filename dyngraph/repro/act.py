"""Adaptive Computation Time on parity (Graves 2016).

Claim: with ACT, a recurrent network solves parity by pondering, and ponders longer on harder
inputs (more non-zero bits); the same network with one fixed step does not. Here: n = 8,
GRU 128, tau = 1e-3; a fixed-one-step network trained alike; then n = 16 (reported).
"""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.evaluate import evaluate  # noqa: E402
from .common import DOCS, save_figure, save_result, spearman, spec_dict, splits, train_spec  # noqa: E402


@torch.no_grad()
def _steps_by_nonzero(model, test) -> tuple[list[int], list[float], float]:
    out = model(test.x)
    steps = out.trace.steps[:, 0].float()
    nz = test.meta["nonzero"]
    ks = sorted(set(nz.tolist()))
    return ks, [float(steps[nz == k].mean()) for k in ks], spearman(steps.numpy(), nz.numpy())


def run(quick: bool = False) -> dict:
    result = {}
    model = train_spec("act_parity", quick)
    _, test = splits(model)
    r = evaluate(model, test)
    ks, steps, rho = _steps_by_nonzero(model, test)
    result["act_n8"] = {
        "accuracy": r["quality"],
        "mean_steps": float(
            sum(s * (test.meta["nonzero"] == k).sum() for k, s in zip(ks, steps, strict=True))
            / len(test)
        ),
        "nonzero": ks,
        "steps_by_nonzero": steps,
        "spearman": rho,
    }
    fixed = copy.deepcopy(spec_dict("act_parity"))
    fixed["name"] = "act_parity_fixed1"
    fixed["graph"][0]["halting"]["max_steps"] = 1
    fm = train_spec(fixed, quick)
    result["fixed_one_step_n8"] = {"accuracy": evaluate(fm, splits(fm)[1])["quality"]}
    n16 = copy.deepcopy(spec_dict("act_parity"))
    n16["name"] = "act_parity_n16"
    n16["input"]["shape"] = [16]
    n16["train"]["data"]["params"]["bits"] = 16
    m16 = train_spec(n16, quick)
    t16 = splits(m16)[1]
    r16 = evaluate(m16, t16)
    k16, s16, rho16 = _steps_by_nonzero(m16, t16)
    result["act_n16"] = {
        "accuracy": r16["quality"],
        "steps_by_nonzero": s16,
        "nonzero": k16,
        "spearman": rho16,
    }
    save_result("act" + ("_quick" if quick else ""), result)
    plot(result, DOCS / ("act_quick.png" if quick else "act.png"))
    return result


def plot(result: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, style in (("act_n8", "o-"), ("act_n16", "s--")):
        r = result[key]
        ax.plot(
            r["nonzero"],
            r["steps_by_nonzero"],
            style,
            label=f"{key}: accuracy {100 * r['accuracy']:.1f}%",
        )
    ax.set_xlabel("number of non-zero input bits (difficulty)")
    ax.set_ylabel("mean ponder steps")
    ax.set_title(
        f"ACT parity (fixed 1 step, n=8: {100 * result['fixed_one_step_n8']['accuracy']:.1f}%)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
