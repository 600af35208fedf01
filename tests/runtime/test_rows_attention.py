"""The running tokens' attention per sample (runtime/attention.cpp, `QueryGrid.attend`): the
same answer as SDPA on the padded query grid, and within 5% of the ideal MACs where the grid
was not (#16: executed / ideal <= 1.05, what is computed past the ideal reported)."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.blocks.sequence import QUERY_BLOCK, TransformerBlock, blocked_pairs, query_grid
from dyngraph.cost import flop_counter
from dyngraph.forcing import forced
from dyngraph.runtime import kernels, token_rows
from dyngraph.runtime.token_rows import grid_of

from ..conftest import SPECS, compiled, diversify, random_batch


@pytest.fixture(autouse=True)
def built(monkeypatch):
    """The kernels, and attention per sample at every length (short ones, too, for the tests:
    the runtime keeps the padded grid below PER_SAMPLE_FROM)."""
    assert kernels.load() and kernels.per_sample(kernels.for_device(torch.device("cpu")))
    monkeypatch.setattr(token_rows, "PER_SAMPLE_FROM", 1)


def _running(b: int, n: int, p: float, seed: int) -> torch.Tensor:
    active = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < p
    active[0] = False  # a sequence with no running token
    active[-1] = True  # one with every token running
    return active


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, p", [(1, 0.5), (7, 0.5), (40, 0.3), (100, 0.1)])
def test_attention_per_sample_equals_the_padded_grid(dtype, causal, n, p):
    torch.manual_seed(0)
    blk = TransformerBlock(32, 4, 2.0, causal, "gelu").to(dtype).eval()
    x = torch.randn(5, n, 32, dtype=dtype)
    active = _running(5, n, p, seed=n)
    with torch.no_grad():
        grid = grid_of(active)
        assert grid.padded is None  # per sample: no grid, no mask
        got = blk.forward_rows(x, grid)
        want = blk.forward_rows(x, query_grid(active))
        full = blk(x).reshape(-1, 32)[active.reshape(-1)]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got, want, **tol)
    # a running token's new state is the full layer's (every token a key and a value)
    torch.testing.assert_close(got, full, **tol)


PARTIAL = [p for p in SPECS if any(u.rows is not None for u in compiled(p, "none").units)]


@pytest.mark.parametrize("path", PARTIAL, ids=lambda p: p.stem)
def test_every_spec_with_partial_queries_runs_alike_on_the_grid(path):
    """Per-token exits and Universal-Transformer halting: the same decisions, outputs within
    float rounding, per sample as on the padded grid; each sequence as if run alone."""
    torch.manual_seed(0)
    model = dg.compile(path, backend="none").eval()  # (its own: the halting below changes it)
    diversify(model)
    with torch.no_grad():
        for h in model.haltings:  # halting probabilities spread around 0.5: 2..6 steps
            fc = h.unit.module.halt.fc
            g = torch.Generator().manual_seed(3)
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 4 / fc.in_features**0.5)
            fc.bias.zero_()
    x = random_batch(model, 40, seed=7)
    with torch.no_grad():
        got = model(x)
        with kernels.padded_attention():
            want = model(x)
        alone = model(x[5:6])
    assert torch.equal(got.trace.decisions(), want.trace.decisions())
    for name, t in want.trace.tokens.items():
        assert torch.equal(got.trace.tokens[name], t), name
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.logits[5:6], alone.logits, atol=1e-5, rtol=1e-4)
    assert got.trace.query_padding_macs < want.trace.query_padding_macs


def test_threads_split_the_samples_and_change_nothing():
    torch.manual_seed(2)
    blk = TransformerBlock(32, 4, 2.0, True, "gelu").eval()
    x, active = torch.randn(9, 50, 32), _running(9, 50, 0.4, seed=4)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = blk.attn.forward_rows(x, grid_of(active))
            torch.set_num_threads(2)
            two = blk.attn.forward_rows(x, grid_of(active))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # (each sample's arithmetic is the same on any thread)


def test_no_running_token_is_an_empty_result():
    blk = TransformerBlock(16, 2, 2.0, True, "gelu").eval()
    with torch.no_grad():
        got = blk.forward_rows(torch.randn(3, 9, 16), grid_of(torch.zeros(3, 9, dtype=torch.bool)))
    assert got.shape == (0, 16)


def test_under_autograd_it_runs_the_padded_grid():
    """Training through `forward_rows` (the kernel has no backward): SDPA on the grid."""
    torch.manual_seed(1)
    blk = TransformerBlock(16, 2, 2.0, True, "gelu")
    x = torch.randn(3, 12, 16, requires_grad=True)
    active = _running(3, 12, 0.5, seed=3)
    grid = grid_of(active)
    y = blk.forward_rows(x, grid)
    y.sum().backward()
    assert x.grad is not None and grid.padded == int(active.sum(1).max())
    with torch.no_grad():
        torch.testing.assert_close(y, blk.forward_rows(x, query_grid(active)))


def test_wrong_positions_are_refused_not_read():
    ops = kernels.for_device(torch.device("cpu"))
    q, kv = torch.randn(2, 8), torch.randn(1, 4, 16)
    offsets = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="positions in"):
        ops.rows_attention(q, kv, torch.tensor([1, 4]), offsets, 2, QUERY_BLOCK, True)
    with pytest.raises(RuntimeError, match="positions in"):
        ops.rows_attention(q, kv, torch.tensor([2, 1]), offsets, 2, QUERY_BLOCK, True)


def _exit_model(length: int) -> dg.DynamicModel:
    """Embedding, a per-token exit, a causal transformer layer, the last exit (the token
    benchmarks' model, benchmarks/token_exits.py)."""
    head = {"type": "token_classifier", "classes": 8}
    spec = {
        "dyngraph": 1,
        "name": "exit_rows",
        "input": {"shape": [length], "dtype": "int64", "vocab": 32, "pad_id": 0},
        "task": {"type": "classification", "classes": 8, "per": "token"},
        "graph": [
            {"type": "embedding", "vocab": 32, "dim": 64},
            {
                "exit": {
                    "per": "token",
                    "head": dict(head),
                    "criterion": {"type": "max_prob", "threshold": 0.9},
                }
            },  # fmt: skip
            {"type": "transformer_block", "heads": 4, "mlp_ratio": 4, "causal": True},
            {"exit": {"per": "token", "head": dict(head)}},
        ],
    }
    torch.manual_seed(0)
    return dg.compile(spec, backend="none").eval()


@pytest.mark.parametrize("length, c", [(256, 0.5), (256, 0.125), (64, 0.25)])
def test_executed_macs_stay_within_5_percent_of_the_ideal(length, c):
    """At L = 256 a padded grid under a causal mask computed 11-16% past the ideal; per
    sample, a block reads the keys up to its last query: executed = ideal + what the trace
    reports, within 1.05 x ideal."""
    model = _exit_model(length)
    ids = torch.randint(1, 32, (8, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), forced(model, exit=1 - c), flop_counter() as fc:
        out = model(ids)
    executed = fc.get_total_flops() // 2
    ideal = int(model.per_input_macs(out.trace, counter="torch").sum())
    assert executed == ideal + out.trace.query_padding_macs
    assert ideal < executed <= 1.05 * ideal


def test_short_sequences_keep_the_padded_grid(monkeypatch):
    monkeypatch.setattr(token_rows, "PER_SAMPLE_FROM", 64)
    active = _running(4, 63, 0.5, seed=1)
    assert grid_of(active).padded == int(active.sum(1).max())
    assert grid_of(torch.ones(2, 64, dtype=torch.bool)).padded is None


def test_the_pairs_counted_are_the_blocks():
    """Two samples: 3 queries at 0, 5, 9 (one block, reads 10 keys each), and
    QUERY_BLOCK + 1 queries (a full block, then one)."""
    pos = torch.tensor([0, 5, 9, *range(QUERY_BLOCK + 1)])
    offsets = torch.tensor([0, 3, 4 + QUERY_BLOCK])
    full = QUERY_BLOCK * QUERY_BLOCK + (QUERY_BLOCK + 1)
    assert blocked_pairs(pos, offsets, 20, causal=True) == 3 * 10 + full
    assert blocked_pairs(pos, offsets, 20, causal=False) == (4 + QUERY_BLOCK) * 20
