"""Measuring a model on data: infer passes, quality, compute by meta column, and the
decision setting that trades one for the other (a construct's `sweep`)."""

from __future__ import annotations

import torch

from .. import tasks
from ..constructs.api import Sweep


def sweep_setting(model) -> Sweep | None:
    """The setting this model's accuracy-versus-MACs curve sweeps (and calibration fits): the
    one of the construct with the lowest `sweep_rank` that offers one."""
    for c in sorted(model._constructs.values(), key=lambda c: c.sweep_rank):
        if c.sweep is not None and model.nodes[c.key]:
            s = c.sweep(model, model.nodes[c.key])
            if s is not None:
                return s
    return None


@torch.no_grad()
def run_infer(model, x: torch.Tensor, batch_size: int, counter: str):
    """Logits and per-input MACs of an infer pass over `x` in batches."""
    logits, macs = [], []
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size])
        logits.append(out.logits)
        macs.append(model.per_input_macs(out.trace, counter))
    return torch.cat(logits), torch.cat(macs)


def quality(model, logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (classification; per token: over labelled positions) or NMSE in dB."""
    return tasks.quality(model.spec.task, logits, y)


def by_meta(meta: dict[str, torch.Tensor], macs: torch.Tensor, quality_of=None) -> dict[str, list]:
    """Inputs, mean MACs and (given `quality_of(mask)`) quality for each value of every meta
    column with at most 32 integer values (a difficulty, a group): where compute goes."""
    out = {}
    for col, values in meta.items():
        if values.dim() != 1 or values.is_floating_point() or values.unique().numel() > 32:
            continue
        rows = []
        for v in values.unique().tolist():
            sel = values == v
            row = {
                "value": v,
                "inputs": int(sel.sum()),
                "mean_macs": float(macs[sel].double().mean()),
            }
            if quality_of is not None:
                row["quality"] = quality_of(sel)
            rows.append(row)
        out[col] = rows
    return out
