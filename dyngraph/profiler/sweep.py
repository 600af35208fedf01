"""Accuracy versus compute: sweep one decision setting and re-run infer for each value.

Each point is an exact infer pass (real traces, real MACs), so the curve holds for any mix of
constructs. The setting swept is the one of the construct with the lowest `sweep_rank` that
offers one (training/measure.py).
"""

from __future__ import annotations

import torch

from .. import tasks
from ..data import Data
from ..training.measure import quality, run_infer, sweep_setting


def sweep(model, data: Data, batch_size: int, counter: str) -> dict | None:
    """The accuracy (or NMSE) versus mean MACs curve over the model's main decision setting."""
    setting = sweep_setting(model)
    if setting is None or data.y is None:
        return None
    name, grid, apply, restore = setting
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = data.x.to(device)
    points = []
    try:
        for v in grid:
            apply(v)
            logits, macs = run_infer(model, x, batch_size, counter)
            points.append(
                {
                    "value": v,
                    "mean_macs": float(macs.float().mean()),
                    "quality": quality(model, logits, data.y),
                }
            )
    finally:
        restore()
    return {"setting": name, "metric": _metric(model), "points": points}


def _metric(model) -> str:
    return tasks.metric(model.spec.task)
