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


def _spread(spec, bias: float, scale: float) -> dg.DynamicModel:
    """A model of `spec` whose halting unit's probabilities spread out (bias, weights x scale),
    so that positions ponder different numbers of steps."""
    torch.manual_seed(0)
    m = dg.compile(spec, backend="none").eval()
    with torch.no_grad():
        fc = m.haltings[0].unit.module.fc
        fc.bias.fill_(bias)
        fc.weight.mul_(scale)
    return m


@pytest.fixture(scope="module")
def model():
    """The spec's model; positions ponder 1..8 steps."""
    return _spread(SPEC, -2.0, 50.0)


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


# ------------------------------------------------------------- PonderNet through time

PONDER = SPEC.read_text().replace(
    "halting: {rule: act, carry: true, step: {type: gru_step, dim: 128}, max_steps: 8,\n"
    "              epsilon: 0.01, ponder_cost: 0.001, step_flag: true}",
    "halting: {rule: pondernet, carry: true, step: {type: gru_step, dim: 128}, max_steps: 8,\n"
    "              threshold: 0.5, prior: 0.3}",
)


@pytest.fixture(scope="module")
def ponder():
    """PonderNet through time, its lambdas spread out (positions halt after 3..6 steps)."""
    assert "pondernet" in PONDER
    return _spread(PONDER, -1.0, 30.0)


@torch.no_grad()
def _ponder_reference(model, seq: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """PonderNet at every position, written out: each position halts where its probability
    of having halted reaches the threshold; that step's state goes on."""
    node = model.haltings[0]
    step, unit = node.steps[0].module, node.unit.module
    x = model.units[0](seq)[0][0]
    s, states, steps = torch.zeros(1, node.inner.state_shape[0]), [], []
    for t in range(x.shape[0]):
        h, left = s, 1.0
        for n in range(node.inner.max_steps):
            h = step(h, x[t : t + 1])
            left *= 1 - float(unit(h))
            if n == node.inner.max_steps - 1 or 1 - left >= node.threshold:
                break
        s = h
        states.append(s[0])
        steps.append(n + 1)
    return torch.stack(states), steps


def test_pondernet_positions_halt_on_their_own_and_carry_the_halting_state(ponder):
    x = random_batch(ponder, 64)
    seq = x[(x != 0).all(1)][:1]
    states, steps = _ponder_reference(ponder, seq)
    out = ponder(seq)
    assert out.trace.tokens["halting 0"][0].tolist() == steps
    assert len(set(steps)) > 1
    head = ponder.units[-1].module  # a segment: it returns a tuple
    torch.testing.assert_close(out.logits[0], head(states[None])[0][0], atol=1e-5, rtol=0)


def test_pondernet_batch_equals_alone_in_every_mode(ponder):
    x = random_batch(ponder, 16)
    out = ponder(x)
    dense = ponder(x, mode="dense")
    torch.testing.assert_close(dense.logits, out.logits, atol=1e-5, rtol=0)
    assert torch.equal(dense.trace.tokens["halting 0"], out.trace.tokens["halting 0"])
    for i in range(x.shape[0]):
        n = int((x[i] != 0).sum())
        alone = ponder(x[i : i + 1])
        assert torch.equal(alone.trace.tokens["halting 0"][0], out.trace.tokens["halting 0"][i])
        torch.testing.assert_close(alone.logits[0, :n], out.logits[i, :n], atol=1e-5, rtol=0)
    macs = token_macs(ponder, out.trace, width=x.shape[1])
    assert torch.equal(macs.sum(1), ponder.per_input_macs(out.trace))


def test_pondernet_objective_is_per_position(ponder):
    """sum over n of p_t,n L_t(y_t,n) and KL(p_t || geometric), averaged over labelled
    positions, each position with its own halting distribution."""
    from dyngraph.training.loss import compute_loss

    x = random_batch(ponder, 8)
    y = torch.randint(0, 46, x.shape)
    y[x == 0] = -100
    stage = dg.load_spec(PONDER).spec.train.stages[0]
    ponder.train()
    try:
        out = ponder(x, mode="train")
        loss, terms = compute_loss(ponder, out, x, y, stage)
        loss.backward()
        grad = ponder.haltings[0].unit.module.fc.weight.grad
        assert grad is not None and grad.abs().sum() > 0  # the lambdas learn from both terms
    finally:
        ponder.eval()
        ponder.zero_grad(set_to_none=True)
    assert "task" not in terms  # PonderNet's expected loss replaces it
    ex = out.extras["halting"][0]
    lam = torch.stack([q.detach() for q in ex["probs"]])  # [T, B, L]
    assert lam.shape == (8, *x.shape)
    left, p = torch.ones_like(lam[0]), []
    for n in range(8):
        p.append(left if n == 7 else left * lam[n])
        left = left * (1 - lam[n])
    p = torch.stack(p)
    head = ponder.units[-1].module
    ce = torch.stack(
        [
            torch.nn.functional.cross_entropy(
                head(s.detach())[0].transpose(1, 2), y, ignore_index=-100, reduction="none"
            )
            for s in ex["states"]
        ]
    )
    lab = y != -100
    want = (p * ce).sum(0)[lab].mean().detach()
    assert abs(terms["ponder_reconstruction"] - float(want)) < 1e-4
    # training carries the state that inference carries: the same steps at every position
    infer = ponder(x)
    valid = x != 0
    assert torch.equal(ex["steps"] * valid, infer.trace.tokens["halting 0"].clamp_min(0))


def test_pondernet_through_time_needs_token_labels():
    text = PONDER.replace("task: {type: classification, classes: 46, per: token}",
                          "task: {type: classification, classes: 46}").replace(
        "  - {type: token_classifier, classes: 46}", "  - {type: classifier, classes: 46}"
    )  # fmt: skip
    with pytest.raises(dg.SpecError, match="needs labels per token") as e:
        dg.compile(text, backend="none")
    assert len(str(e.value).strip().splitlines()) == 1
