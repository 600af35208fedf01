"""Evaluation on a split: accuracy (or NMSE), mean MACs per input, and how inputs were routed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..data import Data
from ..profiler.sweep import quality


@torch.no_grad()
def evaluate(model, data: Data, batch_size: int = 512, counter: str = "fvcore") -> dict[str, Any]:
    """Infer-mode metrics of `model` on `data`."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logits, macs, paths, exits = [], [], [], []
    for i in range(0, len(data), batch_size):
        out = model(data.x[i : i + batch_size].to(device))
        logits.append(out.logits.cpu())
        macs.append(model.per_input_macs(out.trace, counter))
        paths.append(out.trace.path_id.cpu())
        exits.append(out.trace.exit.cpu())
    logits, macs = torch.cat(logits), torch.cat(macs)
    path = torch.cat(paths)
    full = model.static_macs(counter)
    res: dict[str, Any] = {
        "inputs": len(data),
        "mean_macs": float(macs.double().mean()),
        "full_macs": full,
        "macs_fraction": float(macs.double().mean()) / full,
        "paths": {model.describe_path(int(p)): c for p, c in Counter(path.tolist()).most_common()},
        "per_input_macs": macs,
        "logits": logits,
    }
    if model.exits:
        res["exits"] = dict(sorted(Counter(torch.cat(exits).tolist()).items()))
    if data.y is not None:
        res["quality"] = quality(model, logits, data.y)
    res["by_meta"] = {
        col: _by_value(model, values, macs, logits, data.y)
        for col, values in data.meta.items()
        if values.dim() == 1 and not values.is_floating_point() and values.unique().numel() <= 32
    }
    return res


def _by_value(model, values, macs, logits, y) -> list[dict[str, Any]]:
    """Inputs, mean MACs and quality for each value of a meta column (e.g. difficulty k)."""
    rows = []
    for v in values.unique().tolist():
        sel = values == v
        row = {"value": v, "inputs": int(sel.sum()), "mean_macs": float(macs[sel].double().mean())}
        if y is not None:
            row["quality"] = quality(model, logits[sel], y[sel])
        rows.append(row)
    return rows
