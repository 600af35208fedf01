"""What `dyngraph inspect` prints: segments, decision points, paths, static MACs."""

from __future__ import annotations

from .runtime.model import DynamicModel


def count_paths(model: DynamicModel) -> int:
    """The number of distinct decision tuples (paths) the model can take: counted along the
    plan, each construct node multiplying the paths still going (`paths` of its definition)."""
    owner = {id(n): c for c in model._constructs.values() for n in model.nodes[c.key]}
    done, going = 0, 1
    for step in model._plan.steps:
        c = owner.get(id(step))
        if c is not None and c.paths is not None:
            done, going = c.paths(step, done, going)
    return done + going


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
    if model.spec.input.is_sequence:
        n = model.spec.input.shape[0]
        lines.append(
            f"a sequence model: MACs above are for a sequence of the longest length ({n}); a "
            f"shorter one costs its own length's (one sequence of 1 token: "
            f"{int(model.max_path_counts() @ model.unit_macs(counter, 1)):,} on the longest path), "
            "and each length is part of the path"
        )
    lines.append(
        f"static MACs of the longest path (every gate on, costliest choices, max steps): {model.static_macs(counter):,}"
    )
    for c in model._constructs.values():
        if c.describe is not None and model.nodes[c.key]:
            lines += c.describe(model, model.nodes[c.key], counter)
    return "\n".join(lines)
