"""Streaming (#18): a stream of inputs, every stage on full batches, gives each input's own
outputs and trace; queues are bounded; halting loops refill freed slots; one-line errors."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.cli import main
from dyngraph.forcing import forced
from dyngraph.runtime import stream_queue

from ..conftest import SPECS, compiled, forced_decisions, random_batch

BY_NAME = {p.stem: p for p in SPECS}
GATED = [p for p in SPECS if "gate:" in p.read_text()]  # (where pooled bodies differ)


def pieces(x: torch.Tensor, sizes=(5, 37, 1, 60)):
    """`x` as a generator of uneven batches (a data loader's inputs)."""
    i, k = 0, 0
    while i < x.shape[0]:
        n = sizes[k % len(sizes)]
        yield x[i : i + n]
        i, k = i + n, k + 1


def assert_same(model, got, want) -> None:
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    for name, col in want.trace.columns.items():
        assert torch.equal(got.trace.columns[name], col), name
    assert torch.equal(got.trace.unit_counts, want.trace.unit_counts)
    assert torch.equal(got.trace.path_id, want.trace.path_id)
    assert torch.equal(model.per_input_macs(got.trace), model.per_input_macs(want.trace))
    for name, t in want.trace.tokens.items():
        assert torch.equal(got.trace.tokens[name], t), name


@pytest.mark.parametrize(
    "path, pool",
    [(p, False) for p in SPECS] + [(p, True) for p in GATED],
    ids=[p.stem for p in SPECS] + [f"{p.stem}-pooled_bodies" for p in GATED],
)
def test_a_stream_gives_each_input_its_own_outputs_and_trace(path, pool):
    # (decisions spread by the test models' weights and thresholds, which float noise of
    # another batch composition does not flip; forced draws would amplify it)
    model = compiled(path, "none")
    x = random_batch(model, 103, seed=5)
    got = dg.stream(model, pieces(x), batch_size=16, max_rows=40, pool_bodies=pool)
    assert_same(model, got, model(x))
    for i in (0, 37, 102):  # and each input run alone
        alone = model(x[i : i + 1])
        torch.testing.assert_close(got.logits[i : i + 1], alone.logits, atol=1e-5, rtol=1e-4)
        assert int(got.trace.path_id[i]) == int(alone.trace.path_id[0])
    assert got.stats["peak_rows"] <= 40 and got.latency.shape == (103,)
    assert got.stats["full_runs"] > 0 or model._seq is not None


def _queues(monkeypatch) -> list:
    """Every queue made from now on (to count their rows independently of the stream)."""
    made = []
    init = stream_queue.Queue.__init__

    def record(self):
        init(self)
        made.append(self)

    monkeypatch.setattr(stream_queue.Queue, "__init__", record)
    return made


@pytest.mark.parametrize("max_rows", [16, 23, 100])
@pytest.mark.parametrize("name", ["digits_early_exit", "skipnet_rnn", "act_parity", "calm_tagger"])
def test_the_rows_waiting_never_pass_the_bound(monkeypatch, name, max_rows):
    model = compiled(BY_NAME[name], "none")
    queues, seen = _queues(monkeypatch), [0]
    push = stream_queue.Queue.push

    def counted(self, src, pos):
        push(self, src, pos)
        seen[0] = max(seen[0], sum(len(b) for q in queues for b in q.blocks))

    monkeypatch.setattr(stream_queue.Queue, "push", counted)
    x = random_batch(model, 300, seed=2)
    out = dg.stream(model, x, batch_size=16, max_rows=max_rows)
    assert_same(model, out, model(x))
    assert 16 <= seen[0] <= max_rows and out.stats["peak_rows"] == seen[0]


def _sizes(trace, unit: int) -> list[int]:
    return [n for u, n in trace.unit_calls() if u == unit]


def test_every_stage_runs_full_batches_until_the_input_ends():
    model = compiled(BY_NAME["digits_early_exit"], "none")
    x = random_batch(model, 4000, seed=3)
    b = 64
    with forced_decisions(model):  # 40% leave at each exit
        out = dg.stream(model, x, batch_size=b)
        batched = [model(x[i : i + b]).trace for i in range(0, 4000, b)]
    blocks = [u.index for u in model.units if u.kind == "segment"]
    for u in blocks:  # one short run per stage at most: the end of the input
        sizes = _sizes(out.trace, u)
        assert sizes and sum(n < b for n in sizes) <= 1, (model.units[u].name, sizes)
    deep = blocks[-2]  # per batch, a deep stage runs a few rows of every batch
    assert all(n < b for t in batched for n in _sizes(t, deep))


def test_the_sequences_that_go_on_past_a_per_token_exit_are_pooled_across_inputs():
    model = compiled(BY_NAME["calm_tagger"], "none")
    x = torch.randint(1, 7, (600, 16), generator=torch.Generator().manual_seed(0))  # (one length)
    b = 32
    with forced(model, exit=0.9):  # each token leaves at each exit with probability 0.9
        out = dg.stream(model, x, batch_size=b)
        batched = [model(x[i : i + b]).trace for i in range(0, 600, b)]
        assert_same(model, out, model(x))
    deep = [u.index for u in model.units if u.kind == "segment"][-2]
    sizes = _sizes(out.trace, deep)  # full batches of the sequences left, until the end
    assert sizes and sum(n < b for n in sizes) <= 1, sizes
    assert all(n < b // 2 for t in batched for n in _sizes(t, deep))  # per batch: a few


def test_rows_that_nearly_fill_a_batch_go_on_in_the_same_run():
    model = compiled(BY_NAME["digits_early_exit"], "none")
    x = random_batch(model, 640, seed=6)
    b = 64
    with forced(model, exit=0.04):  # 96% go on at each exit
        out = dg.stream(model, x, batch_size=b)
        assert_same(model, out, model(x))
    blocks = [u.index for u in model.units if u.kind == "segment"]
    sizes = [n for u in blocks[1:] for n in _sizes(out.trace, u)]
    # compacted in the run (some rows left) and on at once, short of a full batch
    assert any(7 * b <= 8 * n < 8 * b for n in sizes), sizes
    assert out.stats["runs"] < len(blocks) * 640 // b


def test_a_halting_loop_refills_freed_slots_with_new_inputs():
    model = compiled(BY_NAME["act_parity"], "none")
    h = model.haltings[0]
    x = random_batch(model, 2000, seed=4)
    b = 32
    with forced(model, halting=(1, h.max_steps)):  # (outputs: the test over every spec)
        out = dg.stream(model, x, batch_size=b)
    steps = out.trace.steps[:, 0]
    assert int(steps.min()) == 1 and int(steps.max()) == h.max_steps
    sizes = _sizes(out.trace, h.steps[0].index)
    # every ponder step runs a full batch of rows, each at its own step, until the input ends
    # (then the loop runs out: at most max_steps short runs)
    assert sum(sizes) == int(steps.sum())
    assert sum(n < b for n in sizes) <= h.max_steps


def test_a_model_in_training_mode_streams_in_eval_mode_and_stays_in_training():
    model = compiled(BY_NAME["digits_early_exit"], "none")
    x = random_batch(model, 50)
    want = dg.stream(model, x, batch_size=16)
    model.train()
    try:
        got = dg.stream(model, x, batch_size=16)
        assert model.training
    finally:
        model.eval()
    assert_same(model, got, want)


def test_latency_and_throughput_are_reported():
    model = compiled(BY_NAME["digits_early_exit"], "none")
    out = dg.stream(model, random_batch(model, 200), batch_size=32)
    s = out.stats
    assert s["inputs"] == 200 and s["throughput"] > 0
    assert bool((out.latency >= 0).all()) and 0 <= s["latency_p50_ms"] <= s["latency_p99_ms"]
    quiet = dg.stream(model, random_batch(model, 200), batch_size=32, latency=False)
    assert quiet.stats["latency_p50_ms"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"batch_size": 8, "max_rows": 4}, "max_rows must be an integer >= batch_size"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    model = compiled(BY_NAME["digits_early_exit"], "none")
    with pytest.raises(ValueError, match=message) as e:
        dg.stream(model, random_batch(model, 10), **kwargs)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors_and_lose_nothing():
    model = compiled(BY_NAME["digits_early_exit"], "none")
    x = random_batch(model, 50)
    want = dg.stream(model, x, batch_size=8)
    bad = x.clone()
    bad[7, 3] = float("nan")
    for inputs, err, text in (
        (bad, ValueError, "rows 7"),
        ([x[:5], "not a tensor"], TypeError, "expected a tensor"),
        (torch.empty(0, *model.spec.input.shape), ValueError, "held no inputs"),
        (x[:, :3], ValueError, "expected input"),
    ):
        with pytest.raises(err, match=text) as e:
            dg.stream(model, inputs, batch_size=8)
        assert "\n" not in str(e.value)
    assert_same(model, dg.stream(model, x, batch_size=8), want)  # nothing left behind


@pytest.mark.parametrize("per_batch", [False, True])
def test_eval_streams_unless_asked_for_batches(capsys, per_batch):
    args = ["eval", str(BY_NAME["skipnet_ff"])] + (["--per-batch"] if per_batch else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("in independent batches" if per_batch else "streamed (batch 512)") in out
    assert "latency per input (entry to result) p50" in out
    assert main([*args, "--max-rows", "100"]) == 2  # a bound below one batch
    assert capsys.readouterr().err.strip().endswith("at least the batch size (512)")


def test_pooled_gate_bodies_run_full_batches():
    model = compiled(BY_NAME["skipnet_ff"], "none")
    x = random_batch(model, 3000, seed=6)
    b = 64
    with forced_decisions(model):  # each body runs for 60% of the rows
        pooled = dg.stream(model, x, batch_size=b, pool_bodies=True)
        in_place = dg.stream(model, x, batch_size=b)
    for g in model.gates:
        sizes = _sizes(pooled.trace, g.body.index)
        assert sizes and sum(n < b for n in sizes) <= 1, (g.name, sizes)
        assert sum(n < b for n in _sizes(in_place.trace, g.body.index)) > 10


def test_float_sequences_stream_with_their_lengths():
    spec = {
        "dyngraph": 1,
        "name": "float_seq_exits",
        "input": {"shape": [6, 4], "sequence": True},
        "task": {"type": "classification", "classes": 3},
        "graph": [
            {"type": "linear", "out": 8},
            {"type": "transformer_block", "heads": 2},
            {"exit": {"head": {"type": "classifier", "classes": 3},
                      "criterion": {"type": "max_prob", "threshold": 0.4}}},
            {"type": "transformer_block", "heads": 2},
            {"exit": {"head": {"type": "classifier", "classes": 3}}},
        ],
    }  # fmt: skip
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    x = torch.randn(90, 6, 4)
    n = torch.randint(1, 7, (90,), generator=torch.Generator().manual_seed(1))
    want = model(x, lengths=n)
    assert 0 < int((want.trace.exit == 0).sum()) < 90  # some sequences leave early
    got = dg.stream(model, x, batch_size=8, lengths=n)
    assert_same(model, got, want)
    assert torch.equal(got.trace.lengths, n)
    with pytest.raises(ValueError, match="lengths go with one tensor") as e:
        dg.stream(model, [x[:10], x[10:]], batch_size=8, lengths=n)
    assert "\n" not in str(e.value)
