"""The fused decision kernels decide exactly as the ATen ops they replace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dyngraph as dg
from dyngraph.constructs.exit import confidence
from dyngraph.constructs.token_gate import top_positions
from dyngraph.runtime import kernels
from dyngraph.runtime.context import draw_scale, pseudo_uniform

from ..conftest import ROOT, compiled, forced_decisions, random_batch


def test_the_kernels_build_and_load_here():
    """CI proves the fast path exists: without it every decision runs as ATen ops."""
    assert kernels.load(), "the fused decision kernels did not build (see the warning)"


@pytest.fixture
def ops() -> kernels.Ops:
    assert kernels.load()
    return kernels.for_device(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_rows_where_on_exit_criteria_matches_the_confidence_it_reports(ops, dtype, temperature):
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(200, 10, generator=g)).to(dtype)
    p = torch.softmax(z / temperature, dim=1)
    conf = ops.confidence(z, kernels.MAX_PROB_BELOW, temperature)
    ent = ops.confidence(z, kernels.ENTROPY_ABOVE, temperature)
    torch.testing.assert_close(conf, p.amax(1))
    torch.testing.assert_close(ent, -(p * p.log()).sum(1))
    for rule, score, thr, stays in [
        (kernels.MAX_PROB_BELOW, conf, float(conf.median()), lambda s, t: s < t),
        (kernels.ENTROPY_ABOVE, ent, float(ent.median()), lambda s, t: s > t),
        (kernels.MAX_PROB_BELOW, conf, float(conf[7]), lambda s, t: s < t),  # a tie at row 7
    ]:
        got = ops.rows_where(z, rule, thr, temperature)
        want = torch.where(stays(score, torch.tensor(thr, dtype=dtype)))[0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(300, 8), (300, 3, 4, 4)])
def test_forced_draws_are_bit_equal_to_pseudo_uniform(ops, shape):
    x = 4 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    u = pseudo_uniform(x, 7)
    for thr in (0.0, 0.3, float(u[11]), 1.0):
        t = torch.tensor(thr)
        at_least = ops.rows_where(x, kernels.DRAW_AT_LEAST, thr, draw_scale(7))
        below = ops.rows_where(x, kernels.DRAW_BELOW, thr, draw_scale(7))
        assert torch.equal(at_least, torch.where(u >= t)[0])
        assert torch.equal(below, torch.where(u < t)[0])


def test_gate_rule_reads_its_column(ops):
    p = torch.rand(50, 4, generator=torch.Generator().manual_seed(2))
    for col in range(4):
        got = ops.rows_where(p, kernels.AT_LEAST, 0.5, col)
        assert torch.equal(got, torch.where(p[:, col] >= 0.5)[0])
    with pytest.raises(RuntimeError, match="column 4 out of range"):
        ops.rows_where(p, kernels.AT_LEAST, 0.5, 4)


def test_choose_groups_rows_as_argmax_bincount_and_a_stable_sort(ops):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(100, 5, generator=g).round()  # many ties: argmax takes the first
    scores[9, 2] = float("nan")  # argmax takes a NaN
    c, order, counts = ops.choose(scores, kernels.ARGMAX, torch.zeros(0), 0.0)
    assert torch.equal(c, scores.argmax(1))
    assert counts == torch.bincount(c, minlength=5).tolist()
    assert torch.equal(order, torch.sort(c, stable=True).indices)
    x = torch.randn(100, 6, generator=g)
    edges = torch.tensor([0.5, 0.2, 0.2, 0.1]).cumsum(0)[:-1]
    c, order, counts = ops.choose(x, kernels.DRAW_BUCKET, edges, draw_scale(3))
    assert torch.equal(c, torch.bucketize(pseudo_uniform(x, 3), edges, right=True))
    assert counts == torch.bincount(c, minlength=4).tolist()
    assert torch.equal(order, torch.sort(c, stable=True).indices)


def test_gather_rows_is_index_select_for_every_tensor(ops):
    g = torch.Generator().manual_seed(4)
    ts = [
        torch.randn(9, 5, generator=g),
        torch.randint(0, 100, (9,), generator=g),
        torch.randn(9, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 9, generator=g).t(),  # not contiguous
    ]
    rows = torch.tensor([8, 0, 3, 3])
    for got, t in zip(ops.gather_rows(ts, rows), ts, strict=True):
        assert torch.equal(got, t.index_select(0, rows))
    with pytest.raises(RuntimeError, match="row 9 out of 9"):
        ops.gather_rows(ts, torch.tensor([1, 9]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_copy_rows_is_index_copy_of_the_selected_rows(ops, dtype):
    g = torch.Generator().manual_seed(5)
    dst = torch.randn(9, 2, 3, generator=g).mul(5).to(dtype)
    src = torch.randn(6, 2, 3, generator=g).mul(5).to(dtype)
    dst_rows, src_rows = torch.tensor([7, 0, 4]), torch.tensor([5, 5, 1])
    want = dst.clone().index_copy_(0, dst_rows, src.index_select(0, src_rows))
    got = dst.clone()
    ops.copy_rows_(got, dst_rows, src, src_rows)
    assert torch.equal(got, want)
    got = dst.clone()  # every source row, in order
    ops.copy_rows_(got, torch.tensor([8, 2, 1, 0, 3, 6]), src, None)
    assert torch.equal(got, dst.clone().index_copy_(0, torch.tensor([8, 2, 1, 0, 3, 6]), src))
    got = dst[:6].clone()  # every destination row
    ops.copy_rows_(got, None, src, None)
    assert torch.equal(got, src)


def test_copy_rows_refuses_what_index_copy_refuses(ops):
    dst, src = torch.zeros(4, 3), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="dst_rows 4 out of 4"):
        ops.copy_rows_(dst, torch.tensor([0, 4]), src, None)
    with pytest.raises(RuntimeError, match="src_rows -1 out of 2"):
        ops.copy_rows_(dst, torch.tensor([0]), src, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="as many rows"):
        ops.copy_rows_(dst, torch.tensor([0, 1, 2]), src, None)
    for bad in (torch.ones(2, 4), src.double(), torch.ones(3, 2).t()):
        with pytest.raises(RuntimeError, match="one dtype and row shape"):
            ops.copy_rows_(dst, torch.tensor([0, 1]), bad, None)
    assert torch.equal(dst, torch.zeros(4, 3)), "a refused copy wrote nothing"


@pytest.mark.parametrize("everyone", [True, False], ids=["first-exit", "later-exit"])
@pytest.mark.parametrize("rule", ["max_prob", "bool"])
def test_token_exit_decides_and_marks_as_the_aten_ops_do(ops, everyone, rule):
    """A per-token exit's kernel: the tokens that fail the rule leave (positions among the
    running ones), their logits land at their flat rows, new active / exit_at tensors mark
    them (the old ones untouched: the trace's log holds them), and the samples that keep a
    running token are listed."""
    g = torch.Generator().manual_seed(6)
    b, n, c = 6, 9, 4
    active = torch.ones(b, n, dtype=torch.bool) if everyone else torch.rand(b, n, generator=g) < 0.6
    if not everyone:
        active[2] = False  # a sequence whose tokens had all left
    exit_at = torch.where(active, -1, 0)
    before = (active.clone(), exit_at.clone())
    flat = None if everyone else active.view(-1).nonzero().flatten()
    rows = torch.arange(b * n) if everyone else flat
    z = 2 * torch.randn(rows.numel(), c, generator=g)
    if rule == "max_prob":
        t, r, thr = z, kernels.MAX_PROB_BELOW, 0.6
        stays = ops.confidence(z, kernels.MAX_PROB_BELOW, 1.0) < torch.tensor(0.6)
    else:
        stays = torch.rand(rows.numel(), generator=g) < 0.5
        t, r, thr = stays, kernels.TRUE, 0.0
    out = torch.zeros(b * n, c)
    go, act, at, alive = ops.token_exit(t, r, thr, 1.0, flat, active, exit_at, out, z, 3)
    want_go = torch.where(~stays)[0]
    left = rows[want_go]
    want_active = active.view(-1).index_fill(0, left, False).view(b, n)
    assert torch.equal(go, want_go)
    assert torch.equal(act, want_active)
    assert torch.equal(at, exit_at.view(-1).index_fill(0, left, 3).view(b, n))
    assert torch.equal(alive, torch.where(want_active.any(1))[0])
    want_out = torch.zeros(b * n, c)
    want_out[left] = z[want_go]
    assert torch.equal(out, want_out)
    assert torch.equal(active, before[0]) and torch.equal(exit_at, before[1])
    none = torch.ones(rows.numel(), dtype=torch.bool)  # nobody leaves: the same tensors back
    _, act, at, _ = ops.token_exit(none, kernels.TRUE, 0.0, 0.0, flat, active, exit_at, out, z, 1)
    assert act is active and at is exit_at


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_tokens_routes_as_the_aten_path(ops, dtype):
    """Mixture-of-Depths capacity routing: each sequence's top k tokens in their order, ties
    to the earlier position as token_gate.top_positions takes them (NaN first, -0 = +0), the
    route mask, flat rows and weights."""
    g = torch.Generator().manual_seed(8)
    p = torch.rand(7, 16, generator=g, dtype=dtype).round(decimals=1)  # many ties
    p[3] = 0.5  # a sequence of equal probabilities
    p[5, [2, 9]] = float("nan")  # (nonfinite = "propagate")
    p[6] = torch.linspace(-1, 1, 16, dtype=dtype)
    p[6, 4], p[6, 11] = 2.0, 2.0
    p[6, 5], p[6, 12] = -0.0, 0.0  # equal: the earlier goes first
    for k in range(1, 17):
        idx, route, flat, w = ops.top_tokens(p, k)
        want = top_positions(p, k)
        assert torch.equal(idx, want)
        assert torch.equal(route, torch.zeros_like(p, dtype=torch.bool).scatter_(1, want, True))
        assert torch.equal(flat, (want + torch.arange(7).unsqueeze(1) * 16).view(-1))
        torch.testing.assert_close(w, p.reshape(-1)[flat].unsqueeze(1), equal_nan=True)
        assert torch.equal(idx[3], torch.arange(k))  # all tied: the first k positions
        assert {2, 9} & set(idx[5].tolist()) == ({2} if k == 1 else {2, 9})  # NaN first
    # 2.0 at 4 and 11, then 1.0 down to 0.067 (positions 15 ... 8), then -0 (5) before +0 (12)
    assert ops.top_tokens(p, 9)[0][6].tolist() == [4, 5, 8, 9, 10, 11, 13, 14, 15]
    with pytest.raises(RuntimeError, match="1 <= k <= L"):
        ops.top_tokens(p, 17)


def test_the_id_checks_match_the_aten_ones(ops):
    """The range of token ids, and each sequence's length before its trailing padding, with
    the verdict that sends a malformed batch to the ATen ops that name its rows."""
    ids = torch.randint(1, 30, (40, 12), generator=torch.Generator().manual_seed(4))
    for i in range(40):
        ids[i, 12 - i % 6 :] = 0
    assert ops.id_range(ids) == (int(ids.min()), int(ids.max()))
    lengths, ok, whole = ops.pad_lengths(ids, 0)
    assert ok and not whole and torch.equal(lengths, (ids != 0).sum(1))
    assert ops.pad_lengths(ids[::6].contiguous(), 0)[1:] == (True, True)  # rows without padding
    inside, empty = ids.clone(), ids.clone()
    inside[3, 2] = 0  # a pad before a token
    empty[5] = 0  # all padding
    assert not ops.pad_lengths(inside, 0)[1] and not ops.pad_lengths(empty, 0)[1]


def _run_both(model, x):
    with torch.no_grad():
        fast = model(x)
        with kernels.disabled():
            slow = model(x)
    return fast, slow


@pytest.mark.parametrize("forced", [False, True], ids=["criteria", "forced"])
def test_every_spec_decides_alike_with_and_without_kernels(spec_path, forced):
    """Same decisions, same executed units, same outputs (batch 64 and one sample), bit for
    bit. (The running tokens' attention per sample sums in another order than SDPA: its own
    test below; forced draws, which hash the values, would amplify that.)"""
    model = compiled(spec_path, "none")
    with forced_decisions(model, forced), kernels.padded_attention():
        x = random_batch(model, 64, seed=5)
        for batch in (x, x[:1], x[1:2]):
            fast, slow = _run_both(model, batch)
            assert torch.equal(fast.trace.decisions(), slow.trace.decisions())
            assert torch.equal(fast.trace.unit_counts, slow.trace.unit_counts)
            assert fast.trace.tokens.keys() == slow.trace.tokens.keys()
            for name, got in fast.trace.tokens.items():  # per-token decisions, token by token
                assert torch.equal(got, slow.trace.tokens[name]), name
            torch.testing.assert_close(fast.logits, slow.logits, rtol=0, atol=0)


def test_without_kernels_the_runtime_runs_on_aten_ops():
    """DYNGRAPH_KERNELS=0 (as on a machine that cannot build them): nothing is built or
    loaded, and the model decides as it does with the kernels."""
    code = (
        "import json, torch, dyngraph as dg\n"
        "from dyngraph.runtime import kernels\n"
        "torch.manual_seed(0)\n"
        "m = dg.compile('specs/skipnet_ff.yaml', backend='none').eval()\n"
        "assert not kernels.load() and kernels.for_device(torch.device('cpu')) is None\n"
        "x = torch.randn(32, *m.spec.input.shape, generator=torch.Generator().manual_seed(1))\n"
        "print(json.dumps(m(x).trace.decisions().tolist()))\n"
    )
    env = {**os.environ, "DYNGRAPH_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    torch.manual_seed(0)
    model = dg.compile(ROOT / "specs" / "skipnet_ff.yaml", backend="none").eval()
    assert kernels.for_device(torch.device("cpu")) is not None
    x = torch.randn(32, *model.spec.input.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(x).trace.decisions().tolist() == json.loads(out.stdout)


def test_confidence_uses_the_kernel_numbers_on_cpu():
    """Thresholds set on `confidence` split the samples as the infer runtime does (ties too)."""
    z = 3 * torch.randn(64, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(
        confidence(z, "max_prob", 1.0), kernels.for_device(z.device).confidence(z, 0, 1.0)
    )


@pytest.mark.parametrize("shape", [(32, 64), (5, 1), (3, 16), (0, 8)])
def test_the_query_grid_equals_the_aten_one(ops, shape):
    """The running tokens' grid (rows, slots, width, causal mask) as blocks/sequence.py's
    query_grid builds it, including sequences with no running token (all padding)."""
    from dyngraph.blocks.sequence import query_grid

    g = torch.Generator().manual_seed(shape[0])
    active = torch.rand(shape, generator=g) < 0.4
    if shape[0] > 2:
        active[1] = False  # a sequence with nothing running
    want = query_grid(active)
    rows, slots, mask, width = ops.query_grid(active)
    assert width == want.width
    assert torch.equal(rows, want.rows) and torch.equal(slots, want.slots)
    assert torch.equal(mask, want.mask) and mask.dtype == want.mask.dtype


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path, monkeypatch):
    """torch's builder waits for ever on a lock file; one older than 10 minutes is stale."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = kernels._build_directory()
    lock = folder / "lock"
    lock.touch()
    assert kernels._build_directory() == folder and lock.exists()  # a build may be running
    old = lock.stat().st_mtime - 601
    os.utime(lock, (old, old))
    kernels._build_directory()
    assert not lock.exists()


def test_without_a_compiler_a_warning_says_why_and_the_model_still_runs(tmp_path):
    code = (
        "import warnings, torch, dyngraph as dg\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = dg.compile('specs/skipnet_ff.yaml', backend='none').eval()\n"
        "print([str(x.message) for x in w if 'kernels' in str(x.message)])\n"
        "print(m(torch.randn(8, *m.spec.input.shape)).logits.shape[0])\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-cxx")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    warned, rows = out.stdout.strip().splitlines()[-2:]
    assert "could not be built" in warned and "DYNGRAPH_KERNELS=0" in warned
    assert rows == "8"
