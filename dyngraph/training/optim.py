"""Optimizers, schedules and trainable parts of a stage."""

from __future__ import annotations

import math

import torch

from ..compiler.names import leaves


def trainable_parameters(model, names: list[str]) -> list[torch.nn.Parameter]:
    """Parameters of the named parts: all, backbone, heads (prediction heads: exit heads), controllers (every
    other decision unit), or unit/module names (a unit's name like "exit 2 head", a named module
    or controller)."""
    groups: dict[str, set[int]] = {
        "all": set(),
        "backbone": set(),
        "heads": set(),
        "controllers": set(),
    }
    by_id = {}
    for u in model.units:
        part = (
            "heads"
            if (u.kind == "decision" and u.head)
            else ("controllers" if u.kind == "decision" else "backbone")
        )
        for p in u.module.parameters():
            by_id[id(p)] = p
            groups[part].add(id(p))
            groups["all"].add(id(p))
            groups.setdefault(u.name, set()).add(id(p))
    for name, m in [*leaves(model.blocks), *model.controllers.items()]:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # `graph.1` selects every block below it
            groups.setdefault(".".join(parts[:k]), set()).update(id(p) for p in m.parameters())
    for p in model.parameters():
        by_id.setdefault(id(p), p)
        groups["all"].add(id(p))
    chosen: set[int] = set()
    for n in names:
        if n not in groups:
            from ..core.errors import did_you_mean

            raise ValueError(f"unknown trainable part '{n}'{did_you_mean(n, groups)}")
        chosen |= groups[n]
    return [p for p in model.parameters() if id(p) in chosen]


def make_optimizer(spec, params) -> torch.optim.Optimizer:
    if spec.type == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.type == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def lr_factor(spec, step: int, total: int) -> float:
    """The learning-rate multiplier at `step` of `total`."""
    f = step / max(total, 1)
    if spec.type == "constant":
        return 1.0
    if spec.type == "cosine":
        return 0.5 * (1 + math.cos(math.pi * f))
    if spec.type == "step":
        return spec.gamma ** (step // spec.step_size)
    if f < spec.warmup:  # onecycle: rise from 4% then cosine down to ~0
        return 0.04 + 0.96 * f / spec.warmup
    return 0.5 * (1 + math.cos(math.pi * (f - spec.warmup) / (1 - spec.warmup))) + 1e-4


def make_schedule(spec, opt, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s, total))
