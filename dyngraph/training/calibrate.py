"""Calibration on the validation split: temperature scaling per exit, then the decision
setting (exit thresholds, Composer's gamma, gate or halting thresholds) that meets a MAC budget.
"""

from __future__ import annotations

import math

import torch

from ..data import Data
from ..profiler.sweep import run_infer, sweep_setting


@torch.no_grad()
def fit_temperatures(model, val: Data, batch_size: int = 512) -> list[float]:
    """Per exit, the temperature minimizing the validation NLL (post-hoc temperature scaling)."""
    if not model.exits or val.y is None or model.spec.task.type != "classification":
        return []
    logits = [[] for _ in model.exits]
    for i in range(0, len(val), batch_size):
        out = model(val.x[i : i + batch_size], mode="dense")
        for e, z in enumerate(out.extras["exit_logits"]):
            logits[e].append(z)
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 200)
    temps = []
    for e, zs in zip(model.exits, logits, strict=True):
        z = torch.cat(zs)
        nll = torch.stack([torch.nn.functional.cross_entropy(z / t, val.y) for t in grid])
        e.temperature = float(grid[int(nll.argmin())])
        temps.append(e.temperature)
    return temps


@torch.no_grad()
def calibrate_budget(
    model, val: Data, budget: float, batch_size: int = 512, counter: str = "fvcore", iters: int = 24
) -> dict:
    """Set the model's main decision setting so that mean MACs on `val` is at most
    `budget` x the longest path's MACs, as close to it as the setting allows (bisection)."""
    setting = sweep_setting(model)
    if setting is None:
        raise ValueError(f"{model.name} has no decision setting to calibrate")
    name, grid, apply, _restore = setting
    target = budget * model.static_macs(counter)

    def mean_macs(v: float) -> float:
        apply(v)
        return float(run_infer(model, val.x, batch_size, counter)[1].double().mean())

    lo, hi = min(grid), max(grid)
    m_lo, m_hi = mean_macs(lo), mean_macs(hi)
    increasing = m_hi >= m_lo
    cheap, dear = (lo, hi) if increasing else (hi, lo)
    if min(m_lo, m_hi) > target:
        apply(cheap)
        return {
            "setting": name,
            "value": cheap,
            "mean_macs": min(m_lo, m_hi),
            "target": target,
            "met": False,
        }
    a, b = cheap, dear  # mean_macs(a) <= target; move toward b while it stays under
    best = (a, min(m_lo, m_hi))
    for _ in range(iters):
        mid = (a + b) / 2
        m = mean_macs(mid)
        if m <= target:
            a, best = mid, (mid, m)
        else:
            b = mid
    apply(best[0])
    return {"setting": name, "value": best[0], "mean_macs": best[1], "target": target, "met": True}
