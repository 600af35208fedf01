"""Assembling a stage's loss: the task loss, plus each construct's own objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import tasks


@dataclass
class LossContext:
    """What a construct's objective reads (its `objective(lc)`, constructs/*.py)."""

    model: object
    out: object
    x: torch.Tensor
    y: torch.Tensor
    options: object  # the stage's options of the construct whose objective runs
    ramp: float = 1.0  # penalty ramp factor in [0, 1]
    task_replaced: bool = False

    def task_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample task loss [B]: cross-entropy, or MSE averaged over the target's values."""
        return tasks.loss(self.model.spec.task, logits, self.y)

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Per sample [B]; per token: whether every labelled position is right."""
        hit = tasks.correct(self.model.spec.task, logits, self.y)
        return hit if hit.dim() == 1 else (hit | (self.y == tasks.IGNORE)).all(1)

    def tail(self, node, value: torch.Tensor) -> torch.Tensor:
        return self.model.tail(node, value)


def compute_loss(
    model, out, x, y, stage, ramp: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of a train-mode forward pass and its named terms (for logging): each
    construct's objective with its options in `stage`, then the task loss unless one replaced
    it, weighted by `stage.objective.task_weight`."""
    lc = LossContext(model, out, x, y, None, ramp)
    terms: dict[str, torch.Tensor] = {}
    for key, c in model._constructs.items():
        if c.objective is not None and model.nodes[key]:
            lc.options = stage.options(key)
            terms.update(c.objective(lc))
    if not lc.task_replaced:
        terms["task"] = lc.task_loss(out.logits).mean()
    if "task" in terms:
        terms["task"] = stage.objective.task_weight * terms["task"]
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}
