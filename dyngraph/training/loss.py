"""Assembling a stage's loss: the task loss, plus each construct's own objective."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..constructs import CONSTRUCTS

#: which extras key tells that a construct's nodes ran in this forward pass
_EXTRAS = {"exit": "exit_logits", "gate": "gates", "metalayer": "choices", "halting": "halting"}


@dataclass
class LossContext:
    """What a construct's objective reads (see constructs/*.py `*_objective`)."""

    model: object
    out: object
    x: torch.Tensor
    y: torch.Tensor
    objective: object
    ramp: float = 1.0  # penalty ramp factor in [0, 1]
    task_replaced: bool = False

    def task_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample task loss [B]: cross-entropy, or MSE averaged over the target's values."""
        if self.model.spec.task.type == "classification":
            return torch.nn.functional.cross_entropy(logits, self.y, reduction="none")
        return (logits - self.y).pow(2).flatten(1).mean(1)

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self.y

    def tail(self, node, value: torch.Tensor) -> torch.Tensor:
        return self.model.tail(node, value)

    def greedy(self):
        """The same batch with every free gate decided hard (BlockDrop's self-critical baseline)."""
        with hard_gates(self.model):
            return self.model(self.x, mode="train")


@contextlib.contextmanager
def hard_gates(model):
    saved = [g.mode_override for g in model.gates]
    for g in model.gates:
        g.mode_override = "hard"
    try:
        yield
    finally:
        for g, m in zip(model.gates, saved, strict=True):
            g.mode_override = m


def compute_loss(
    model, out, x, y, objective, ramp: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of a train-mode forward pass and its named terms (for logging)."""
    lc = LossContext(model, out, x, y, objective, ramp)
    terms: dict[str, torch.Tensor] = {}
    for key, c in CONSTRUCTS.items():
        if c.objective is not None and out.extras.get(_EXTRAS.get(key, key)):
            terms.update(c.objective(lc))
    if not lc.task_replaced:
        terms["task"] = lc.task_loss(out.logits).mean()
    if "task" in terms:
        terms["task"] = objective.task_weight * terms["task"]
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}
