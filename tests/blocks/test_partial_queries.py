"""A transformer layer for some tokens only, every token still a key and a value (the kernel of
per-token exits: CALM's frozen states): exact against the full layer at those tokens, and
never copying keys or values per query."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyngraph.blocks.sequence import TransformerBlock, query_grid


def _layer(causal: bool) -> TransformerBlock:
    torch.manual_seed(0)
    return TransformerBlock(32, 4, 2.0, causal, "gelu").eval()


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_some_tokens_get_the_full_layer_s_output(causal):
    blk = _layer(causal)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, 32, generator=g)
    active = torch.rand(6, 10, generator=g) < 0.35
    active[2] = False  # a sequence with no token running
    active[4] = True  # one with every token
    grid = query_grid(active)
    got = blk.forward_rows(x, grid)
    want = blk(x).reshape(-1, 32).index_select(0, grid.rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    xq = x.reshape(-1, 32).index_select(0, grid.rows)  # the caller's copy of their states
    torch.testing.assert_close(blk.forward_rows(x, grid, xq), got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_frozen_tokens_serve_as_keys_and_values_with_their_own_state():
    """A token that stopped keeps its state: changing it changes what later active tokens
    read (it is a key and a value), yet it gets no output of its own."""
    blk = _layer(causal=True)
    x = torch.randn(1, 8, 32)
    active = torch.zeros(1, 8, dtype=torch.bool)
    active[0, 5:] = True  # positions 0..4 frozen
    grid = query_grid(active)
    a = blk.forward_rows(x, grid)
    y = x.clone()
    y[0, 2] += torch.randn(32)  # a frozen token's state (not a constant: LN removes it)
    b = blk.forward_rows(y, grid)
    assert a.shape == (3, 32) and not torch.allclose(a, b)
    z = x.clone()
    z[0, 6:] += torch.randn(2, 32)  # later tokens: position 5 cannot read them (causal)
    c = blk.forward_rows(z, grid)
    torch.testing.assert_close(c[0], a[0])


class _Shapes(TorchDispatchMode):
    """The shapes of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(t):
                self.sizes.append(t.numel())
        return out


@torch.no_grad()
def test_no_key_or_value_is_copied_per_query():
    blk = _layer(causal=True)
    b, n, d = 4, 64, 32
    x = torch.randn(b, n, d)
    active = torch.rand(b, n) < 0.5
    grid = query_grid(active)
    with _Shapes() as seen:
        blk.forward_rows(x, grid)
    # per-query copies would hold (queries x keys x d) values; the largest tensor of that
    # order here is the attention's (queries x keys x heads) scores
    assert max(seen.sizes) < grid.width * b * n * d / 4
