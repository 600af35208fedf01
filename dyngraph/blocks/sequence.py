"""Sequence blocks: token embedding, attention, the pre-LN transformer block, pooling and
per-token heads.

Every block takes a batch of sequences of one length [B, L, D] (token ids [B, L] for the
embedding): the runtime groups a batch by length, so no block sees padding and a padded
position executes nothing. Attention runs `scaled_dot_product_attention`; its MACs are
counted per query row over the keys it reads (cost.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .basic import PoolHow, TokenPool
from .registry import BlockParams, Shape, ShapeError, in_features, register_block


def _sequence(shapes: list[Shape], what: str) -> tuple[int, int]:
    """(L, D) of a sequence input, or a ShapeError."""
    if len(shapes[0]) != 2:
        raise ShapeError(f"{what} takes a sequence [L, D], got {list(shapes[0])}")
    return shapes[0][0], shapes[0][1]


def sinusoidal(length: int, dim: int) -> torch.Tensor:
    """The fixed position table of Vaswani et al. [length, dim]."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class Embedding(nn.Module):
    """Token ids [B, L] -> vectors [B, L, D]: a token table plus a position table."""

    def __init__(self, vocab: int, dim: int, max_len: int, positions: str):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = positions
        if positions == "learned":
            self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        elif positions == "sinusoidal":
            self.register_buffer("pos", sinusoidal(max_len, dim), persistent=False)
        else:
            self.pos = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        # in place: h is this call's own (the table's backward reads only the ids), and one
        # [B, L, D] tensor fewer is half the time here (B = 32, L = 64, d = 128: 57 vs 117 us)
        return h if self.pos is None else h.add_(self.pos[: ids.shape[1]])


class EmbeddingParams(BlockParams):
    vocab: int = Field(gt=1)
    dim: int = Field(gt=0)
    positions: Literal["learned", "sinusoidal", "none"] = "learned"


@register_block("embedding", EmbeddingParams)
def embedding(p: EmbeddingParams, shapes: list[Shape]) -> nn.Module:
    """Token ids [L] -> [L, dim]: a learned token table plus learned or sinusoidal positions."""
    if len(shapes[0]) != 1:
        raise ShapeError(f"takes token ids [L], got {list(shapes[0])}")
    return Embedding(p.vocab, p.dim, shapes[0][0], p.positions)


class Attention(nn.Module):
    """Multi-head self-attention: one QKV projection, SDPA, an output projection."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        if dim % heads:
            raise ShapeError(f"dim {dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    def forward_rows(
        self, x: torch.Tensor, grid: QueryGrid, xq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention output [N, D] of the running tokens `grid` (`query_grid`) of `x`
        [b, L, D] (`xq` [N, D]: their rows of `x`, if the caller holds them), every token a
        key and a value: the KV rows of the QKV projection on every token, the Q rows on the
        running ones, then `grid.attend`. No key or value is copied per query."""
        b, n, d = x.shape
        w, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, w[d:], bias[d:])  # [b, L, 2D]: keys, then values
        if xq is None:
            xq = grid.take(x.reshape(b * n, d))
        q = F.linear(xq, w[:d], bias[:d])
        return self.proj(grid.attend(q, kv, self.heads, self.causal))


class AttentionParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    heads: int = Field(1, gt=0)
    causal: bool = False


@register_block("attention", AttentionParams)
def attention(p: AttentionParams, shapes: list[Shape]) -> nn.Module:
    """Multi-head self-attention over [L, D] (SDPA; `causal`: each position reads those up to it)."""
    _sequence(shapes, "attention")
    return Attention(in_features(shapes, p.dim, "dim"), p.heads, p.causal)


class TransformerBlock(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool, act: str):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dim = dim
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    def forward_rows(self, x: torch.Tensor, grid: QueryGrid, xq: torch.Tensor | None = None):
        """The layer for some tokens only, every token still a key and a value (CALM's frozen
        states, per-token exits): `x` [b, L, D] every token's current state, `grid` the
        running tokens (`query_grid`), `xq` [N, D] their states if the caller holds them (else
        gathered from `x`). Returns their new states [N, D]: LN1 on every token (keys and
        values read it), attention for the running rows (`Attention.forward_rows`), the MLP on
        those rows only."""
        b, n, d = x.shape
        h = self.norm1(x)
        if xq is None:
            xq, hq = grid.take(x.reshape(b * n, d), h.reshape(b * n, d))
        else:
            hq = grid.take(h.reshape(b * n, d))
        xq = xq + self.attn.forward_rows(h, grid, hq)
        return xq + self.fc2(self.act(self.fc1(self.norm2(xq))))


QUERY_BLOCK = 16  # a sample's queries per block of `rows_attention` (runtime/attention.cpp)


@dataclass
class QueryGrid:
    """Which tokens of a batch of sequences run a layer (`forward_rows` of `attention` and
    `transformer_block`), and how their attention runs (`attend`):
    `rows` [N] their flat positions (sample x L + position), grouped by sample and in order;
    then either, per sample (the runtime's kernel, `rows_attention`: no padding),
    `pos` [N] their positions and `offsets` [b + 1] each sample's first row,
    or, on a padded grid (SDPA; without the kernel, and in exports),
    `slots` [N] their places in a [b, width] grid of queries (width: the most any sample runs)
    and `mask` [b, 1, width, L], an additive causal mask by original position (0 where a query
    reads a key, -inf elsewhere; a padded query reads position 0).
    Built once, it serves every layer until the running set changes."""

    rows: torch.Tensor
    slots: torch.Tensor | None
    width: int
    mask: torch.Tensor | None
    ops: Any = None  # the runtime's row kernels (runtime/kernels.py), where they apply
    pos: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    @property
    def padded(self) -> int | None:
        """The width of its padded query grid; None where attention runs per sample."""
        return None if self.mask is None else self.width

    def attend(self, q: torch.Tensor, kv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
        """Multi-head attention [N, D] of the running tokens' queries `q` [N, D] over every
        token's keys and values `kv` [b, L, 2D] (keys, then values; `causal`: a query at
        position i reads keys 0..i). Per sample where the kernel takes them (each sample's
        queries in blocks of QUERY_BLOCK, a block reading the keys up to its last query's
        position); on the padded grid otherwise, where SDPA computes every (slot, key) pair."""
        if self.mask is None:
            if _kernel_takes(q, kv):
                return torch.ops.dyngraph.rows_attention(
                    q.contiguous(), kv, self.pos, self.offsets, heads, QUERY_BLOCK, causal
                )
            self._pad(kv.shape[1])  # (another dtype, or autograd: the grid from now on)
        b, n, d = kv.shape[0], kv.shape[1], q.shape[1]
        k, v = kv.view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        qg = self.to_grid(q).view(b, self.width, heads, d // heads).transpose(1, 2)
        # (in the queries' dtype: SDPA misreads a float32 mask on float64 queries)
        mask = self.mask.to(q.dtype) if causal else None
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        return self.from_grid(y.transpose(1, 2).reshape(b * self.width, d))

    def _pad(self, n: int) -> None:
        """Become the padded grid of the same tokens."""
        b = self.offsets.numel() - 1
        active = torch.zeros(b * n, dtype=torch.bool, device=self.rows.device)
        g = query_grid(active.index_fill_(0, self.rows, True).view(b, n))
        self.slots, self.width, self.mask, self.ops = g.slots, g.width, g.mask, None

    def take(self, *values: torch.Tensor):
        """The running tokens' rows [N, D] of each [b·L, D] value (one value: a tensor)."""
        if self.ops is not None and all(v.is_contiguous() for v in values):
            got = self.ops.gather_rows(list(values), self.rows)
        else:
            got = [v.index_select(0, self.rows) for v in values]
        return got[0] if len(values) == 1 else got

    def to_grid(self, q: torch.Tensor) -> torch.Tensor:
        """[N, D] rows of the running tokens in their grid slots [b·width, D] (zeros in the
        padded ones)."""
        g = q.new_zeros((self.mask.shape[0] * self.width, q.shape[1]))
        if self.ops is not None and q.is_contiguous():
            self.ops.copy_rows_(g, self.slots, q, None)
            return g
        return g.index_copy_(0, self.slots, q)

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """The running tokens' rows [N, D] of a grid [b·width, D]."""
        if self.ops is not None and y.is_contiguous():
            return self.ops.gather_rows([y], self.slots)[0]
        return y.index_select(0, self.slots)


def _kernel_takes(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether `rows_attention` (a CPU kernel outside autograd) reads these."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and kv.dtype == q.dtype
        and kv.is_contiguous()
        and not (torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad))
    )


def blocked_pairs(
    pos: torch.Tensor, offsets: torch.Tensor, n: int, causal: bool, block: int = QUERY_BLOCK
) -> int:
    """The (query, key) pairs `rows_attention` computes for queries at positions `pos` [N]
    (each sample's from `offsets` [b + 1] on) over n keys: a block of up to `block` of a
    sample's queries reads the keys up to its last query's position (causal), or all n."""
    counts = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(counts.numel(), device=pos.device), counts)
    local = torch.arange(pos.numel(), device=pos.device) - offsets[:-1][sample]
    last = (local % block == block - 1) | (local == counts[sample] - 1)
    rows = local[last] % block + 1  # each block's queries
    return int((rows * (pos[last] + 1 if causal else n)).sum())


def query_grid(active: torch.Tensor) -> QueryGrid:
    """The query grid of the tokens `active` [b, L] (bool)."""
    b, n = active.shape
    counts = active.sum(1)
    width = int(counts.max()) if b else 0
    rows = active.reshape(-1).nonzero().flatten()
    sample = torch.div(rows, n, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts  # each sample's first row among `rows`
    slots = sample * width + torch.arange(rows.numel(), device=rows.device) - first[sample]
    pos = torch.zeros(b * width, dtype=torch.long, device=rows.device)
    pos = pos.index_copy_(0, slots, rows - sample * n).view(b, 1, width, 1)
    # a float mask: SDPA turns a bool one into this form on every call
    keys = torch.arange(n, device=rows.device).view(1, 1, 1, n)
    mask = torch.zeros((b, 1, width, n), device=rows.device).masked_fill_(keys > pos, -math.inf)
    return QueryGrid(rows, slots, width, mask)


class TransformerBlockParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    causal: bool = False
    act: Literal["gelu", "relu"] = "gelu"


@register_block("transformer_block", TransformerBlockParams)
def transformer_block(p: TransformerBlockParams, shapes: list[Shape]) -> nn.Module:
    """A pre-LN transformer layer over [L, D]: attention (`heads`, `causal`) and an MLP of
    `mlp_ratio` x D, each with a residual."""
    _sequence(shapes, "transformer_block")
    return TransformerBlock(
        in_features(shapes, p.dim, "dim"), p.heads, p.mlp_ratio, p.causal, p.act
    )


class PoolParams(BlockParams):
    how: PoolHow = "mean"


@register_block("pool", PoolParams)
def pool(p: PoolParams, shapes: list[Shape]) -> nn.Module:
    """A sequence [L, D] -> [D]: the mean over its tokens, the first or the last."""
    _sequence(shapes, "pool")
    return TokenPool(p.how)


class TokenClassifier(nn.Module):
    per_token = True  # each token's logits from that token alone (registry.acts_per_token)

    def __init__(self, dim: int, classes: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class TokenClassifierParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    classes: int = Field(gt=0)
    norm: bool = True


@register_block("token_classifier", TokenClassifierParams)
def token_classifier(p: TokenClassifierParams, shapes: list[Shape]) -> nn.Module:
    """A per-token head [L, D] -> [L, classes] (token labels, next-token logits)."""
    _sequence(shapes, "token_classifier")
    return TokenClassifier(in_features(shapes, p.dim, "dim"), p.classes, p.norm)
