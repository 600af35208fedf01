"""Each construct's decision rule, checked against a hand computation."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.constructs.exit import confidence
from dyngraph.inspect import count_paths
from tests.conftest import SPECS, compiled, random_batch

BY_NAME = {p.stem: p for p in SPECS}
HEADER = "dyngraph: 1\nname: t\ninput: {shape: [6]}\ntask: {type: classification, classes: 3}\n"


def test_max_prob_exits_where_the_criterion_first_holds():
    model = compiled(BY_NAME["msdnet_early_exit"], "none")
    x = random_batch(model)
    out = model(x)
    dense = model(x, mode="dense").extras["exit_logits"]
    conf = torch.stack([confidence(lg, "max_prob", 1.0) for lg in dense])  # [E, B]
    thr = torch.tensor([e.threshold for e in model.exits[:-1]] + [-1.0])
    meets = conf >= thr[:, None]
    first = meets.float().argmax(0)
    assert torch.equal(out.trace.exit, first)
    assert out.trace.exit.unique().numel() >= 3
    for i in range(x.shape[0]):
        torch.testing.assert_close(out.logits[i], dense[first[i]][i])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_confidence_is_the_top_softmax_probability_and_the_entropy(temperature):
    z = torch.randn(300, 10) * 4
    p = torch.softmax(z / temperature, dim=1)
    torch.testing.assert_close(confidence(z, "max_prob", temperature), p.amax(1))
    entropy = -(p * p.log()).sum(1)
    torch.testing.assert_close(confidence(z, "entropy", temperature), entropy)


def test_patience_exit():
    spec = (
        HEADER
        + """graph:
  - {type: linear, out: 8}
  - repeat: 3
    nodes:
      - {type: residual_mlp, hidden: 8}
      - exit: {head: {type: classifier, classes: 3}, criterion: {type: patience, patience: 1}}
  - exit: {head: {type: classifier, classes: 3}}
"""
    )
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    x = torch.randn(200, 6) * 3
    out = model(x)
    preds = torch.stack([lg.argmax(1) for lg in model(x, mode="dense").extras["exit_logits"]])
    same = preds[1:] == preds[:-1]  # exit e (e >= 1) agrees with exit e-1
    expected = torch.where(same[0], 1, torch.where(same[1], 2, 3))
    assert torch.equal(out.trace.exit, expected)


def _halting_spec(rule_yaml: str) -> str:
    return HEADER + f"graph:\n  - halting: {rule_yaml}\n  - {{type: classifier, classes: 3}}\n"


def _constant_unit(model, p: float) -> None:
    lin = next(m for m in model.haltings[0].unit.module.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(torch.logit(torch.tensor(p)).item())


def test_act_halts_at_one_minus_epsilon_with_remainder():
    model = dg.compile(
        _halting_spec("{rule: act, step: {type: gru_step, dim: 5}, max_steps: 10, epsilon: 0.01}"),
        backend="none",
    ).eval()
    _constant_unit(model, 0.3)  # 0.3 * 4 = 1.2 >= 0.99 first at n = 4; weights .3 .3 .3 .1
    x = torch.randn(7, 6)
    out = model(x)
    assert (out.trace.steps[:, 0] == 4).all()
    model.train()
    tr = model(x).extras["halting"][0]
    model.eval()
    s = tr["states"]
    manual = 0.3 * (s[0] + s[1] + s[2]) + 0.1 * s[3]
    head = model.units[-1]
    torch.testing.assert_close(out.logits, head(manual)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tr["ponder"], torch.full((7,), 4.1), atol=1e-5, rtol=1e-5)


def test_pondernet_halts_at_median_of_its_halting_distribution():
    model = dg.compile(
        _halting_spec("{rule: pondernet, step: {type: gru_step, dim: 5}, max_steps: 10}"),
        backend="none",
    ).eval()
    _constant_unit(model, 0.3)  # P(halted by n) = 0.3, 0.51 -> halts at n = 2
    assert (model(torch.randn(5, 6)).trace.steps[:, 0] == 2).all()


def test_l2s_stops_where_the_policy_says_and_outputs_that_state():
    spec = _halting_spec(
        "{rule: l2s, steps: 4, step: {type: rnn_step, dim: 5}, shared: false, policy: {type: stop_mlp, hidden: 4}}"
    )
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    x = torch.randn(40, 6)
    policy = model.haltings[0].unit.module.policy
    with torch.no_grad():  # sharp stop probabilities, centred so that samples stop at many steps
        policy.net[-1].bias.fill_(0.0)
        q0 = torch.stack(model.train()(x).extras["halting"][0]["probs"])
        policy.net[-1].weight.mul_(20)
        policy.net[-1].bias.fill_(-20 * float(torch.logit(q0.clamp(1e-6, 1 - 1e-6)).median()))
    model.eval()
    out = model(x)
    model.train()
    tr = model(x).extras["halting"][0]
    model.eval()
    q = torch.stack(tr["probs"])  # [T, B]
    stop = q >= 0.5
    stop[-1] = True
    first = stop.float().argmax(0)
    assert torch.equal(out.trace.steps[:, 0], first + 1)
    assert first.unique().numel() >= 2
    states = torch.stack(tr["states"])  # [T, B, n]
    chosen = states[first, torch.arange(40)]
    torch.testing.assert_close(out.logits, model.units[-1](chosen)[0], atol=1e-5, rtol=1e-4)


def test_gates_off_means_identity():
    model = compiled(BY_NAME["skipnet_ff"], "none")
    x = random_batch(model)
    old = [g.threshold for g in model.gates]
    try:
        model.set_threshold(1.0, construct="gate")
        with torch.no_grad():
            for _g in model.gates:  # probabilities < 1: every body skipped
                assert (model(x, mode="dense").trace.gates == 0).all()
        out = model(x)
        seg = [u for u in model.units if u.kind == "segment"]
        expected = seg[-1](seg[0](x)[0])[0]
        torch.testing.assert_close(out.logits, expected)
        body = [u.index for u in model.units if u.name.endswith("body")]
        assert out.trace.unit_counts[:, body].sum() == 0
    finally:
        model.set_threshold(old, construct="gate")


def test_gamma_steers_the_composer_controller():
    model = compiled(BY_NAME["composer_wide_digits"], "none")
    x = random_batch(model, 256)
    a = model(x).trace.choices[:, 0]
    model.set_gamma(10.0)
    b = model(x).trace.choices[:, 0]
    model.set_gamma(0.3)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        model.set_gamma(1.0, preference="nope")


def test_blockdrop_runs_its_policy_once():
    model = compiled(BY_NAME["blockdrop"], "none")
    out = model(random_batch(model))
    policy = [u.index for u in model.units if "policy" in u.name]
    assert len(policy) == 1
    assert (out.trace.unit_counts[:, policy[0]] == 1).all()


def test_path_counts_and_descriptions():
    ee = compiled(BY_NAME["msdnet_early_exit"], "none")
    assert count_paths(ee) == 8
    out = ee(random_batch(ee))
    descs = {ee.describe_path(int(p)) for p in out.trace.path_id.unique()}
    assert all(d.startswith("exit ") for d in descs)
    assert count_paths(compiled(BY_NAME["skipnet_ff"], "none")) == 256
    assert count_paths(compiled(BY_NAME["act_parity"], "none")) == 20


def test_wrong_input_shape_is_a_clear_error():
    model = compiled(BY_NAME["act_parity"], "none")
    with pytest.raises(ValueError, match=r"expected input \[B, 8\]"):
        model(torch.zeros(2, 9))
