"""Per-token exits (CALM): each token leaves on its own and its state is frozen; later layers
read it as a key and a value and compute nothing else for it; a sequence whose tokens have all
left leaves the batch; a batch equals its sequences alone; each token's MACs are exact."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.core.errors import SpecError
from dyngraph.cost import flop_counter
from dyngraph.forcing import forced
from dyngraph.profiler.tokens import depth_per_token, token_macs

from ..conftest import ROOT, compiled, random_batch

SPEC = ROOT / "specs" / "calm_tagger.yaml"


@pytest.fixture(scope="module")
def model():
    return compiled(SPEC, "none")


def _reference(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the spec's modules by hand, as CALM defines it: after each exit the
    tokens whose top probability reaches the threshold keep their logits and their state;
    each later layer updates the other tokens, reading every token as a key and a value.
    Returns (logits [L, C], the exit of each token [L])."""
    units = model.units
    s = units[0](ids)[0]
    n = s.shape[1]
    running = torch.ones(n, dtype=torch.bool)
    out, where = torch.zeros(n, 5), torch.full((n,), -1)
    k = 0
    for u in units[1:]:
        if u.head:
            e = model.exits[k]
            z = u(s)[0]
            p = torch.softmax(z / e.temperature, -1).amax(-1)
            leave = running & ((p >= e.threshold) if not e.last else torch.ones_like(running))
            out[leave], where[leave] = z[leave], k
            running, k = running & ~leave, k + 1
        else:
            s = torch.where(running[None, :, None], u(s)[0], s)
    return out, where


def assert_matches(reference, model, x: torch.Tensor, out) -> None:
    """Each sequence of a pass `out` over `x` against `reference(model, ids)` on it alone:
    every token's exit, and its logits."""
    for i in range(x.shape[0]):
        n = int((x[i] != 0).sum())
        z, where = reference(model, x[i : i + 1, :n])
        assert out.trace.tokens["exit"][i, :n].tolist() == where.tolist()
        torch.testing.assert_close(out.logits[i, :n], z, atol=1e-5, rtol=1e-4)


def test_infer_equals_the_reference_definition(model):
    x = random_batch(model, 24, seed=3)
    out = model(x)
    assert (out.trace.tokens["exit"] >= 1).any() and (out.trace.tokens["exit"] == 0).any()
    assert_matches(_reference, model, x, out)


@pytest.mark.parametrize("mode", ["infer", "dense"])
def test_partial_batches_equal_each_sequence_alone(model, mode):
    x = random_batch(model, 32, seed=4)
    with forced(model, exit=0.4):  # each token leaves each exit with probability 0.4
        out = model(x, mode=mode)
        per = out.trace.tokens["exit"]
        assert len(set(per[per >= 0].tolist())) == 4  # tokens leave at every exit
        macs = model.per_input_macs(out.trace)
        for i in range(x.shape[0]):
            one = model(x[i : i + 1], mode=mode)
            torch.testing.assert_close(one.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
            assert torch.equal(one.trace.decisions()[0], out.trace.decisions()[i])
            assert torch.equal(one.trace.unit_counts[0], out.trace.unit_counts[i])
            assert int(model.per_input_macs(one.trace)[0]) == int(macs[i])


def test_frozen_tokens_run_nothing_and_finished_sequences_leave(model):
    x = random_batch(model, 32, seed=5)
    with forced(model, exit=0.5):
        out = model(x)
    per, lengths = out.trace.tokens["exit"], out.trace.lengths
    layer = model.units[-2]  # the last transformer layer, after exit 2
    running = (per == 3).sum(1)  # the tokens that ran it
    ran = out.trace.unit_counts[:, layer.index]
    assert torch.equal(ran.bool(), running > 0)  # a sequence with no token left never ran it
    assert sum(n for u, n in out.trace.unit_calls() if u == layer.index) == int(ran.sum())
    # its cost: C(i + 1) - C(i) for a running token at position i, frozen ones their K and V
    tokens = token_macs(model, out.trace, width=x.shape[1])
    assert torch.equal(tokens.sum(1), model.per_input_macs(out.trace))
    assert (tokens[per == -1] == 0).all()  # padding costs nothing
    depth = depth_per_token(out.trace, model)
    assert torch.equal(depth[per >= 0], per[per >= 0])  # a token's depth: the layers it ran
    assert int(lengths.min()) < x.shape[1]


def test_a_sequence_running_every_token_costs_the_static_model(model):
    x = torch.randint(1, 7, (8, 16), generator=torch.Generator().manual_seed(6))  # no padding
    with forced(model, exit=0.0):  # nobody leaves before the last exit
        out = model(x)
    assert (out.trace.tokens["exit"] == 3).all()
    assert int(model.per_input_macs(out.trace)[0]) == model.static_macs()
    assert out.trace.query_padding_macs == 0  # every query runs: no grid at all


def test_executed_macs_are_ideal_plus_the_reported_query_padding(model):
    x = random_batch(model, 32, seed=7)
    with forced(model, exit=0.3), torch.no_grad(), flop_counter() as fc:
        out = model(x)
    ideal = int(model.per_input_macs(out.trace, "torch").sum())
    assert out.trace.query_padding_macs > 0
    assert fc.get_total_flops() // 2 == ideal + out.trace.query_padding_macs
    assert fc.get_total_flops() // 2 <= 1.05 * ideal


def test_train_mode_runs_every_token_and_trains_every_exit_per_token(model):
    from dyngraph.training.loss import compute_loss

    loaded = dg.load_spec(SPEC)
    x = random_batch(model, 16, seed=8)
    y = torch.randint(0, 5, x.shape).masked_fill(x == 0, -100)
    model.train()
    try:
        with forced(model, exit=0.5):
            out = model(x)
            dense = model(x, mode="dense")
        assert len(out.extras["exit_logits"]) == 4
        # no token is frozen in training: the last exit reads every token's full depth
        unforced = model(x)
        torch.testing.assert_close(
            out.extras["exit_logits"][-1], unforced.extras["exit_logits"][-1]
        )
        assert not torch.allclose(dense.extras["exit_logits"][-1], out.extras["exit_logits"][-1])
        loss, terms = compute_loss(model, out, x, y, loaded.spec.train.stages[0])
        assert {"task", "distill_kl"} <= set(terms)
        loss.backward()
        for e in model.exits:
            assert e.head.module.fc.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_thresholds_are_settable_and_move_tokens_between_exits(model):
    x = random_batch(model, 32, seed=9)
    saved = [e.threshold for e in model.exits[:-1]]
    try:
        model.set_threshold(0.0)  # every token leaves at the first exit
        assert (model(x).trace.tokens["exit"][x != 0] == 0).all()
        model.set_threshold(1.01)  # none leaves early
        assert (model(x).trace.tokens["exit"][x != 0] == 3).all()
    finally:
        model.set_threshold(saved)


BASE = """
dyngraph: 1
name: bad
input: {shape: [8], dtype: int64, vocab: 7, pad_id: 0}
task: {type: classification, classes: 5, per: token}
graph:
  - {type: embedding, vocab: 7, dim: 16}
  - exit: {per: token, head: {type: token_classifier, classes: 5},
           criterion: {type: max_prob, threshold: 0.9}}
"""
LAST = "  - exit: {per: token, head: {type: token_classifier, classes: 5}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE.replace("classes: 5, per: token}", "classes: 5}") + LAST, "needs a per-token task"),
        (BASE + "  - gate: {body: {type: transformer_block, heads: 2}, policy: {type: ff_gate}}\n"
         + LAST, "cannot follow a per-token exit"),
        (BASE + "  - {type: pool}\n" + LAST, "keeps its shape"),
        (BASE.replace("max_prob, threshold: 0.9", "patience, patience: 2") + LAST,
         "criterion 'patience' counts exits per sample"),
        (BASE + "  - {type: transformer_block, heads: 2}\n"
         + "  - exit: {head: {type: classifier, classes: 5, pool: first}}\n",
         "this exit node cannot follow a per-token exit"),
        (BASE.replace("type: token_classifier, classes: 5},\n", "type: transformer_block},\n")
         + LAST, "shape mismatch"),
    ],
    ids=["sample-task", "gate-after", "pool-after", "patience", "sample-after", "head"],
)  # fmt: skip
def test_specs_that_cannot_run_per_token_get_one_line_errors(text, message):
    with pytest.raises(SpecError) as e:
        dg.compile(text, backend="none")
    assert message in str(e.value), str(e.value)
