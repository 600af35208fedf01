"""What `dyngraph inspect` prints: segments, decision points, paths, static MACs."""

from __future__ import annotations

import torch

from .runtime.model import DynamicModel


def count_paths(model: DynamicModel) -> int:
    """The number of distinct decision tuples (paths) the model can take."""
    done, cont = 0, 1
    for step in model._plan.steps:
        if step in model.exits:
            done += cont
            if step.last:
                cont = 0
        elif step in model.gates:
            cont *= 2
        elif step in model.metalayers:
            cont *= len(step.choices)
        elif step in model.haltings:
            cont *= step.max_steps
    return done + cont


def exit_macs(model: DynamicModel, counter: str = "fvcore") -> list[int]:
    """Cumulative static MACs of a sample leaving at each exit (every earlier unit once)."""
    macs = model.unit_macs(counter)
    weights = model.max_path_counts()
    out = []
    for e in model.exits:
        step_no = e.head.order[0]
        upto = torch.tensor([u.order[0] <= step_no for u in model.units])
        out.append(int((macs * weights * upto).sum()))
    return out


def inspect_text(model: DynamicModel, counter: str = "fvcore") -> str:
    """A report a person reads."""
    macs = model.unit_macs(counter).tolist()
    lines = [f"model {model.name}: {len(model.units)} units, backend {model.backend}", ""]
    w = max(len(u.name) for u in model.units)
    lines.append(f"  {'unit':<{w}}  {'kind':<8}  {'inputs (per sample)':<28}  {'MACs':>12}")
    for u, m in zip(model.units, macs, strict=True):
        shapes = ", ".join(str(list(s)) for s in u.in_shapes)
        lines.append(f"  {u.name:<{w}}  {u.kind:<8}  {shapes:<28}  {m:>12,}")
    lines.append("")
    points = [s for s in model._plan.steps if hasattr(s, "name")]
    lines.append(f"decision points: {len(points)}")
    for p in points:
        lines.append(f"  {p.name}")
    lines.append(f"distinct paths: {count_paths(model):,}")
    lines.append(
        f"static MACs of the longest path (every gate on, costliest choices, max steps): {model.static_macs(counter):,}"
    )
    if model.exits:
        lines.append("")
        lines.append("exits (cumulative MACs of a sample leaving there):")
        full = exit_macs(model, counter)
        for e, m in zip(model.exits, full, strict=True):
            crit = (
                "takes every sample left"
                if e.last
                else f"{e.kind} {e.threshold if e.kind != 'patience' else e.patience}"
            )
            lines.append(
                f"  exit {e.index}: {m:>12,} MACs ({m / full[-1]:.0%} of the last)  [{crit}]"
            )
    return "\n".join(lines)
