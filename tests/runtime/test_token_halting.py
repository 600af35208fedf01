"""Halting over depth per position (Universal Transformer with ACT): each position halts on
its own; a halted position keeps its state and stays a key and a value; a batch equals its
sequences alone; each position's MACs are exact."""

from __future__ import annotations

import math

import pytest
import torch

import dyngraph as dg
from dyngraph.core.errors import SpecError
from dyngraph.cost import flop_counter
from dyngraph.forcing import forced
from dyngraph.profiler.tokens import depth_per_token, token_macs

from ..conftest import ROOT, random_batch

SPEC = ROOT / "specs" / "ut_tagger.yaml"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dg.compile(SPEC, backend="none").eval()
    with torch.no_grad():  # halting probabilities spread around 0.5: 2..6 steps
        fc = m.haltings[0].unit.module.halt.fc
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(3))
                        * 4 / math.sqrt(fc.in_features))  # fmt: skip
        fc.bias.zero_()
    return m


def _reference(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """One sequence by hand, as the Universal Transformer with ACT defines it: each running
    position takes T(s) and a halting probability; it halts when they sum to 1 - epsilon and
    its output is the halting-weighted mean of its states; halted positions keep theirs."""
    h = model.haltings[0]
    unit = h.unit.module
    s = model.units[0](ids)[0]
    n = s.shape[1]
    running, cum = torch.ones(n, dtype=torch.bool), torch.zeros(n)
    acc, steps = torch.zeros_like(s), [0] * n
    for t in range(h.max_steps):
        new, p = unit(s)
        new, p = new[0], p[0]
        for i in range(n):
            if not running[i]:
                continue
            steps[i] += 1
            stop = t == h.max_steps - 1 or cum[i] + p[i] >= 1 - h.epsilon
            acc[0, i] += (1 - cum[i] if stop else p[i]) * new[i]
            cum[i] += p[i]
            s = s.clone()
            s[0, i] = new[i]
            running[i] = not stop
        if not running.any():
            break
    return model.units[-1](acc)[0][0], steps


def test_infer_equals_the_reference_definition(model):
    x = random_batch(model, 12, seed=3)
    out = model(x)
    per = out.trace.tokens["halting 0"]
    assert len(set(per[per > 0].tolist())) >= 3  # positions halt after different steps
    for i in range(x.shape[0]):
        n = int((x[i] != 0).sum())
        z, steps = _reference(model, x[i : i + 1, :n])
        assert per[i, :n].tolist() == steps
        torch.testing.assert_close(out.logits[i, :n], z, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["infer", "dense"])
def test_partial_batches_equal_each_sequence_alone(model, mode):
    # (the model's own halting, which its test weights spread over the steps: a forced draw
    # from each position's state amplifies the float noise of another batch size 10^4-fold,
    # and flipped a position on another CPU)
    x = random_batch(model, 24, seed=4)
    out = model(x, mode=mode)
    per = out.trace.tokens["halting 0"]
    assert len(set(per[per > 0].tolist())) >= 3  # positions leave the loop at different steps
    macs = model.per_input_macs(out.trace)
    for i in range(x.shape[0]):
        one = model(x[i : i + 1], mode=mode)
        torch.testing.assert_close(one.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(one.trace.decisions()[0], out.trace.decisions()[i])
        assert int(model.per_input_macs(one.trace)[0]) == int(macs[i])


def test_halted_positions_run_nothing_and_costs_are_exact(model):
    x = random_batch(model, 32, seed=5)
    with forced(model, halting=(1, 6)), torch.no_grad(), flop_counter() as fc:
        out = model(x)
    per = out.trace.tokens["halting 0"]
    step = model.haltings[0].unit.index
    assert torch.equal(out.trace.unit_counts[:, step], per.clamp_min(0).amax(1))
    assert torch.equal(out.trace.steps[:, 0], per.clamp_min(0).sum(1))
    ideal = int(model.per_input_macs(out.trace, "torch").sum())
    assert fc.get_total_flops() // 2 == ideal + out.trace.query_padding_macs
    assert fc.get_total_flops() // 2 <= 1.05 * ideal
    tokens = token_macs(model, out.trace, width=x.shape[1])
    assert torch.equal(tokens.sum(1), model.per_input_macs(out.trace))
    assert torch.equal(depth_per_token(out.trace, model), per)  # depth: the steps it ran


def test_train_mode_pays_the_ponder_cost_per_position(model):
    from dyngraph.training.loss import compute_loss

    x = random_batch(model, 16, seed=6)
    y = torch.randint(0, 5, x.shape).masked_fill(x == 0, -100)
    model.train()
    try:
        out = model(x)
        ponder = out.extras["halting"][0]["ponder"]
        assert ponder.shape == x.shape
        stage = dg.load_spec(SPEC).spec.train.stages[0]
        loss, terms = compute_loss(model, out, x, y, stage)
        assert {"task", "ponder_0"} <= set(terms)
        loss.backward()
        assert model.haltings[0].unit.module.halt.fc.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


BASE = """
dyngraph: 1
name: bad
input: {shape: [8], dtype: int64, vocab: 7, pad_id: 0}
task: {type: classification, classes: 5, per: token}
graph:
  - {type: embedding, vocab: 7, dim: 16}
  - halting: {rule: act, per: token, max_steps: 3, step: STEP}
  - {type: token_classifier, classes: 5}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE.replace("STEP", "{type: pool}"), "shape mismatch"),
        (BASE.replace("STEP", "{type: transformer_block, heads: 2}, carry: true"),
         "carry is not supported with per: token"),
        (BASE.replace("STEP", "{type: transformer_block, heads: 2}, shared: false"),
         "shares one step across depth"),
        (BASE.replace("{type: embedding, vocab: 7, dim: 16}",
                      "{type: embedding, vocab: 7, dim: 16}\n  - {type: pool}")
         .replace("STEP", "{type: linear, out: 16}"), "needs a sequence [L, D]"),
    ],
    ids=["shape", "carry", "unshared", "not-a-sequence"],
)  # fmt: skip
def test_specs_that_cannot_halt_per_token_get_one_line_errors(text, message):
    with pytest.raises(SpecError) as e:
        dg.compile(text, backend="none")
    assert message in str(e.value), str(e.value)
