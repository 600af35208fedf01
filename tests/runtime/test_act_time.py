"""ACT through time (`halting: {rule: act, carry: true}`): each position ponders on its own,
its halting-weighted state carried to the next; halted rows stop running the step; a batch
equals its sequences alone; MACs follow each position's steps."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.profiler.tokens import token_macs

from ..conftest import ROOT, random_batch

SPEC = ROOT / "specs" / "act_addition.yaml"


@pytest.fixture(scope="module")
def model():
    """The spec's model with halting probabilities spread out (positions ponder 1..8 steps)."""
    torch.manual_seed(0)
    m = dg.compile(SPEC, backend="none").eval()
    with torch.no_grad():
        fc = m.haltings[0].unit.module.fc
        fc.bias.fill_(-2.0)
        fc.weight.mul_(50.0)
    return m


@torch.no_grad()
def _reference(model, seq: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Graves' recurrence written out for one sequence: states [L, H] and steps per position."""
    node = model.haltings[0]
    step, unit, eps, most = (
        node.steps[0].module,
        node.unit.module,
        node.epsilon,
        node.inner.max_steps,
    )
    x = model.units[0](seq)[0][0]  # the embedded tokens [L, E] (a segment returns a tuple)
    s, states, steps = torch.zeros(1, node.inner.state_shape[0]), [], []
    for t in range(x.shape[0]):
        acc, total, h = torch.zeros_like(s), 0.0, s
        for n in range(most):
            h = step(h, x[t : t + 1], torch.full((1, 1), 1.0 if n == 0 else 0.0))
            p = float(unit(h))
            last = n == most - 1 or total + p >= 1 - eps
            acc = acc + (1 - total if last else p) * h
            if last:
                break
            total += p
        s = acc
        states.append(s[0])
        steps.append(n + 1)
    return torch.stack(states), steps


def test_each_position_ponders_on_its_own_state_carried(model):
    x = random_batch(model, 64)
    seq = x[(x != 0).all(1)][:1]  # one full-length sequence
    seen = {}
    head = model.units[-1]
    fn = head.fn

    def keep(*args):
        seen["states"] = args[0]
        return head.module(*args)

    head.fn = keep
    try:
        out = model(seq)
    finally:
        head.fn = fn
    states, steps = _reference(model, seq)
    torch.testing.assert_close(seen["states"][0], states, atol=1e-5, rtol=1e-4)
    assert out.trace.tokens["halting 0"][0].tolist() == steps
    assert int(out.trace.steps[0, 0]) == sum(steps)


def test_halted_rows_stop_running_and_macs_follow_steps(model):
    x = random_batch(model, 32)
    out = model(x)
    per = out.trace.tokens["halting 0"]
    step = model.haltings[0].steps[0].index
    assert per.max() > per[per > 0].min()  # positions ponder different numbers of steps
    assert torch.equal(out.trace.unit_counts[:, step], per.clamp_min(0).sum(1))
    calls = sum(n for u, n in out.trace.unit_calls() if u == step)
    assert calls == int(per.clamp_min(0).sum())  # the step ran only on rows still pondering
    macs = token_macs(model, out.trace, width=x.shape[1])
    assert torch.equal(macs.sum(1), model.per_input_macs(out.trace))
    one = model.unit_macs()[step] + model.unit_macs()[model.haltings[0].unit.index]
    full = x != 0
    embed_head = macs[full] - per[full] * one
    assert (embed_head == embed_head[0]).all()  # the rest of a token's cost is the same


def test_batch_equals_each_sequence_alone(model):
    x = random_batch(model, 16)
    out = model(x)
    for i in range(x.shape[0]):
        n = int((x[i] != 0).sum())
        alone = model(x[i : i + 1])
        assert torch.equal(alone.trace.tokens["halting 0"][0], out.trace.tokens["halting 0"][i])
        torch.testing.assert_close(alone.logits[0, :n], out.logits[i, :n], atol=1e-5, rtol=0)


def test_train_mode_ponder_cost_is_graves_sequence_cost(model):
    x = random_batch(model, 8)
    model.train()
    try:
        out = model(x, mode="train")
    finally:
        model.eval()
    ex = out.extras["halting"][0]
    n = (x != 0).sum(1)
    valid = torch.arange(x.shape[1])[None] < n[:, None]
    # sum over positions of N_t + R_t
    want = ((ex["steps"].float() + ex["remainder"]) * valid).sum(1)
    torch.testing.assert_close(ex["ponder"], want)
    infer = model(x)
    assert torch.equal(ex["steps"] * valid, infer.trace.tokens["halting 0"].clamp_min(0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input: {shape: [8]}\n", "ponders over a sequence"),
        ("input: {shape: [5], dtype: int64, vocab: 11, pad_id: 0}\n", "init is not supported"),
    ],
)
def test_bad_carry_is_a_one_line_error(text, message):
    spec = f"""
dyngraph: 1
name: bad
{text}task: {{type: classification, classes: 2}}
graph:
  - {{type: embedding, vocab: 11, dim: 8}}
  - halting: {{rule: act, carry: true, step: {{type: gru_step, dim: 8}}, max_steps: 3,
              init: {{type: linear, out: 8}}}}
  - {{type: token_classifier, classes: 2}}
"""
    if "vocab" not in text:  # a flat input: no embedding
        spec = spec.replace("  - {type: embedding, vocab: 11, dim: 8}\n", "")
    with pytest.raises(dg.SpecError, match=message) as e:
        dg.compile(spec, backend="none")
    assert len(str(e.value).strip().splitlines()) == 1
