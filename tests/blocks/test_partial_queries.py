"""A transformer layer for some tokens only, every token still a key and a value (the kernel of
per-token exits: CALM's frozen states): exact against the full layer at those tokens, and
never copying keys or values per query."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyngraph.blocks.sequence import Attention, TransformerBlock, query_grid


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


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_attention_for_some_tokens_is_the_full_attention_s(causal):
    torch.manual_seed(0)
    att = Attention(32, 4, causal).eval()
    x = torch.randn(5, 9, 32)
    active = torch.rand(5, 9) < 0.5
    grid = query_grid(active)
    want = att(x).reshape(-1, 32).index_select(0, grid.rows)
    torch.testing.assert_close(att.forward_rows(x, grid), want, atol=1e-5, rtol=0)


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


@pytest.mark.parametrize(
    ("block", "params", "alone"),
    [
        ("residual_mlp", {"hidden": 8, "norm": True}, True),
        ("mlp", {"hidden": 8, "out": 16}, True),
        ("linear", {"out": 16}, True),
        ("layernorm", {}, True),
        ("gelu", {}, True),
        ("token_classifier", {"classes": 3}, True),
        ("attention", {"heads": 2}, False),
        ("transformer_block", {"heads": 2, "mlp_ratio": 1}, False),
        ("pool", {}, False),
    ],
)
@torch.no_grad()
def test_blocks_that_act_per_token_are_known(block, params, alone):
    """`acts_per_token` decides whether the tokens of many sequences may run a unit in one
    call (per-token gates and choices): it must hold exactly where the result does not
    depend on the other tokens."""
    from dyngraph.blocks.registry import acts_per_token, build_block, sequence_model

    with sequence_model(True):
        m = build_block(block, params, [(6, 16)]).eval()
    assert acts_per_token(m) == alone
    if alone:
        a, b = torch.randn(1, 6, 16), torch.randn(1, 4, 16)
        joint = m(torch.cat([a, b], 1))
        torch.testing.assert_close(joint, torch.cat([m(a), m(b)], 1))
