"""Accuracy versus compute: sweep one decision setting and re-run infer for each value.

Each point is an exact infer pass (real traces, real MACs), so the curve holds for any mix of
constructs. Which setting is swept: exit thresholds if the model has exits with a confidence
criterion, else Composer's gamma, else gate thresholds, else halting thresholds (L2S,
PonderNet) or ACT's epsilon.
"""

from __future__ import annotations

import torch

from ..data import Data
from ..data.sets import nmse_db

GRIDS = {
    "max_prob": [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.01],
    "entropy": [10.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, -1.0],
    "gamma": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0],
    "gate": [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0],
    "halting": [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99],
    "epsilon": [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
}


def _attr_setting(nodes: list, attr: str):
    """apply(v) sets `attr` of every node to v; restore() puts the old values back."""
    old = [getattr(n, attr) for n in nodes]

    def apply(v: float) -> None:
        for n in nodes:
            setattr(n, attr, v)

    def restore() -> None:
        for n, o in zip(nodes, old, strict=True):
            setattr(n, attr, o)

    return apply, restore


def sweep_setting(model) -> tuple[str, list[float], object, object] | None:
    """(name, grid, apply(value), restore()) for the setting this model's curve sweeps."""
    exits = [e for e in model.exits[:-1] if e.kind in ("max_prob", "entropy")]
    if exits:
        kind = "max_prob" if any(e.kind == "max_prob" for e in exits) else "entropy"
        return (
            f"exit threshold ({kind})",
            GRIDS[kind],
            *_attr_setting([e for e in exits if e.kind == kind], "threshold"),
        )
    if model.metalayers:
        saved = {k: dict(v) for k, v in model._gamma.items()}

        def restore() -> None:
            model._gamma.clear()
            model._gamma.update(saved)

        return "gamma", GRIDS["gamma"], lambda v: model.set_gamma(v), restore
    if model.gates:
        return ("gate threshold", GRIDS["gate"], *_attr_setting(model.gates, "threshold"))
    hs = [h for h in model.haltings if h.rule in ("l2s", "pondernet")]
    if hs:
        return ("halting threshold", GRIDS["halting"], *_attr_setting(hs, "threshold"))
    acts = [h for h in model.haltings if h.rule == "act"]
    if acts:
        return ("ACT epsilon", GRIDS["epsilon"], *_attr_setting(acts, "epsilon"))
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
    """Accuracy (classification) or NMSE in dB (regression)."""
    if model.spec.task.type == "classification":
        return float((logits.argmax(1).cpu() == y.cpu()).float().mean())
    return nmse_db(logits.cpu(), y.cpu())


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
    return "accuracy" if model.spec.task.type == "classification" else "NMSE (dB)"
