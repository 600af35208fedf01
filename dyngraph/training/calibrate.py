"""Calibration on the validation split: temperature scaling per exit, then the decision
setting (exit thresholds, Composer's gamma, gate or halting thresholds) that meets a MAC budget.
"""

from __future__ import annotations

import torch

from ..data import Data
from .measure import run_infer, sweep_setting


@torch.no_grad()
def fit_temperatures(model, val: Data) -> list[float]:
    """Every construct's own calibration on the validation split (per-exit temperature
    scaling); returns the fitted temperatures, if any."""
    fitted: dict = {}
    for c in model._constructs.values():
        if c.calibrate is not None and model.nodes[c.key]:
            fitted.update(c.calibrate(model, model.nodes[c.key], val))
    return fitted.get("temperatures", [])


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
