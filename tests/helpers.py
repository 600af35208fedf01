"""User blocks for tests (imported by specs with `type: custom` and trust_imports)."""

from __future__ import annotations

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Attention over `tokens` tokens of the input, its scores by baddbmm: an op fvcore cannot
    count (dyngraph gives fvcore a handle for SDPA itself)."""

    def __init__(self, tokens: int, in_shapes=None):
        super().__init__()
        dim = in_shapes[0][-1]
        self.tokens, self.width = tokens, dim // tokens
        self.qkv = nn.Linear(self.width, 3 * self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.view(x.shape[0], self.tokens, self.width)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        scores = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), alpha=self.width**-0.5)
        return torch.bmm(scores.softmax(-1), v).flatten(1)
