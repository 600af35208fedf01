"""What a task asks of the model's output: its loss, what counts as correct, its metric.

`classification` per sample: logits [B, C], labels [B]. Per token (`per: token`) and
`language_model`: logits [B, L, C], labels [B, L] with `IGNORE` at positions that have no label
(padding; a language model's last position). A language model's labels are the next token
(`next_token_targets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.sets import nmse_db

#: The label of a position that has none (padding): cross-entropy's ignore_index.
IGNORE = -100


def per_token(task) -> bool:
    return task.per == "token"


def metric(task) -> str:
    if not task.classifies:
        return "NMSE (dB)"
    return "token accuracy" if per_token(task) else "accuracy"


def loss(task, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B]: cross-entropy (a sequence's mean over its labelled positions) or
    MSE averaged over the target's values."""
    if not task.classifies:
        return (logits - y).pow(2).flatten(1).mean(1)
    if not per_token(task):
        return F.cross_entropy(logits, y, reduction="none")
    ce = token_losses(logits, y)
    n = (y != IGNORE).sum(1).clamp_min(1)
    return ce.sum(1) / n


def token_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, L] of a per-token task (0 where a position has no label)."""
    return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")


def correct(task, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample: right or wrong [B] (per token: [B, L], padding counted as wrong; see
    `quality`, which counts labelled positions only)."""
    return logits.argmax(-1) == y


def quality(task, logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (over labelled positions, per token) or NMSE in dB (regression)."""
    logits, y = logits.cpu(), y.cpu()
    if not task.classifies:
        return nmse_db(logits, y)
    hit = logits.argmax(-1) == y
    if per_token(task):
        labelled = y != IGNORE
        return float(hit[labelled].float().mean()) if labelled.any() else float("nan")
    return float(hit.float().mean())


def next_token_targets(x: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """A language model's labels for token ids `x` [N, L]: the next id at each position,
    `IGNORE` at the last position of each sequence and on padding."""
    y = torch.full_like(x, IGNORE)
    y[:, :-1] = x[:, 1:]
    if pad_id is not None:
        y[y == pad_id] = IGNORE
        y[x == pad_id] = IGNORE
    return y
