"""The exit construct's criteria: when a sample leaves at an exit (constructs/exit.py).

One class each: its schema (a `criterion:` mapping) and `stays(exit, logits, ctx, x)`, the rows
that go on (`x`: the exit's input, one row per sample or per token). A new criterion is one class
marked @criterion here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal, Union

import torch
from pydantic import Field

from ..core.types import ModuleRef, Strict
from ..runtime import kernels
from ..runtime.context import const

if TYPE_CHECKING:  # (exit.py imports this module)
    from .exit import ExitRuntime

#: The criteria, one class each (schema and `stays`); a new one is a class marked @criterion:
#: `kernel`, the fused kernels' rule of the same decision (optional: `stays` is the reference),
#: `lowest`, the lowest threshold a model takes, `grid`, what a sweep tries (None: not swept).
CRITERIA: list[type] = []


def criterion(kernel: int | None, lowest: float, grid: list[float] | None):
    def register(cls: type) -> type:
        cls.kernel, cls.lowest, cls.grid = kernel, lowest, grid
        return CRITERIA.append(cls) or cls

    return register


GRID_P = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.01]  # 1.01: never leave
GRID_H = [10.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, -1.0]  # -1: never leave
#: a learned stop's probability: finer in its middle, where a trained stop's MACs rise fastest
GRID_STOP = (
    [0.0, 0.2, 0.4, 0.5] + [round(0.55 + 0.025 * i, 3) for i in range(15)] + [0.95, 0.99, 1.01]
)


@criterion(kernel=kernels.MAX_PROB_BELOW, lowest=0.0, grid=GRID_P)
class MaxProb(Strict):
    """Leave when the top probability of softmax(logits / temperature) >= threshold."""

    type: Literal["max_prob"]
    threshold: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)

    @staticmethod
    def score(z: torch.Tensor) -> torch.Tensor:
        # 1 / sum(exp(z - max z)), without softmax: its CPU kernel is slow on short rows
        # (256 x 10 logits: 52 us, against 15 us for these four ops)
        return (z - z.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_()

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        score = confidence(logits, "max_prob", e.temperature)
        return score < const(e.threshold, score)


@criterion(kernel=kernels.ENTROPY_ABOVE, lowest=-math.inf, grid=GRID_H)
class Entropy(Strict):
    """Leave when the entropy (nats) of softmax(logits / temperature) <= threshold."""

    type: Literal["entropy"]
    threshold: float = Field(ge=0.0)
    temperature: float = Field(1.0, gt=0.0)

    @staticmethod
    def score(z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z, dim=1)
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        score = confidence(logits, "entropy", e.temperature)
        return score > const(e.threshold, score)


@criterion(kernel=None, lowest=-math.inf, grid=None)  # not swept: a count
class Patience(Strict):
    """PABEE: leave when the predicted class has stayed the same for `patience` consecutive
    exits (counted from the previous exit on)."""

    type: Literal["patience"]
    patience: int = Field(ge=1)

    @staticmethod
    def stays(e: ExitRuntime, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        prev, count = ctx.states.get("exit/pred"), ctx.states.get("exit/count")
        count = torch.zeros_like(pred) if prev is None else torch.where(pred == prev, count + 1, 0)
        ctx.states["exit/pred"], ctx.states["exit/count"] = pred, count
        return count < e.patience


@criterion(kernel=None, lowest=0.0, grid=GRID_STOP)
class Learned(Strict):
    """Per token only: a learned stop (CALM's early-exit classifier, Schuster et al., 2022; the
    Depth-Adaptive Transformer's, Elbayad et al., 2020). A stop unit reads the token's state at
    the exit (its input) and gives p = sigmoid(unit(x)); the token leaves when p >= threshold.
    It is trained beside the model on its input detached (it changes nothing else), by binary
    cross-entropy towards "going deeper would not make this token right": 1 where this exit's
    prediction is correct or the last exit's is wrong as well. It is a decision unit: its MACs
    count for every token it reads."""

    type: Literal["learned"]
    threshold: float = Field(ge=0.0, le=1.0)
    unit: ModuleRef | None = Field(
        None, description="the stop unit, per token [L, D] -> [L, 1] (default: a "
        "token_classifier with one class: LayerNorm and a linear map)")  # fmt: skip

    @staticmethod
    def stays(e, logits: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(e.stop_logits(ctx, x))
        return p < const(e.threshold, p)


Criterion = Annotated[Union[tuple(CRITERIA)], Field(discriminator="type")]  # noqa: UP007
RULES = {c.model_fields["type"].annotation.__args__[0]: c for c in CRITERIA}


def confidence(logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """The score criterion `kind` thresholds (the top probability, the entropy): on the CPU the
    fused kernel's number where it has a kernel rule, so that a threshold set on these scores
    splits the samples as the infer runtime does."""
    rule = RULES[kind]
    d = logits.detach()
    o = kernels.ops(d)
    if rule.kernel is not None and o is not None and d.dim() == 2 and d.is_contiguous():
        return o.confidence(d, rule.kernel, temperature)
    return rule.score(logits if temperature == 1.0 else logits / temperature)
