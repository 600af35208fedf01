"""Per-token metalayers (Composer per token): the controller picks a module for each token,
each module runs on the tokens that picked it as a shorter sequence in their order, a batch
equals its sequences alone, each sequence's MACs are exact, and the Composer objective teaches
the per-token controller to follow gamma."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.constructs import token_metalayer
from dyngraph.cost import flop_counter
from dyngraph.runtime.context import RunContext

from ..conftest import ROOT, diversify, random_batch

SPEC = ROOT / "specs" / "composer_tokens.yaml"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dg.compile(SPEC.read_text(), backend="none").eval()
    diversify(m)  # a controller whose picks depend on each token
    return m


def _full(model, n: int = 64) -> torch.Tensor:
    x = random_batch(model, n)
    return x[(x != 0).all(1)]


def test_tokens_of_one_sequence_pick_different_modules(model):
    x = _full(model)
    out = model(x)
    picked = out.trace.tokens["metalayer 0 choice 1"]
    mixed = ((picked == 1).any(1) & (picked == 0).any(1)).float().mean()
    assert mixed > 0.5  # most sequences send some tokens each way
    # each token ran exactly one choice at each metalayer
    for i in range(len(model.metalayers)):
        ran = sum((out.trace.tokens[f"metalayer {i} choice {j}"] == 1).long() for j in range(2))
        assert (ran == 1).all()


def test_each_choice_runs_on_its_tokens_as_a_shorter_sequence(model):
    x = _full(model)[:1]
    m = model.metalayers[0]
    seen = {}

    def keep(unit, key):
        def run(*args):
            seen[key] = args
            return unit.module(*args)

        return run

    saved = [u.fn for u in (*m.choices, m.router)]
    for j, u in enumerate(m.choices):
        u.fn = keep(u, j)
    m.router.fn = keep(m.router, "router")
    try:
        out = model(x, mode="dense")
    finally:
        for u, fn in zip((*m.choices, m.router), saved, strict=True):
            u.fn = fn
    h = seen["router"][0]  # what the metalayer read
    c = (out.trace.tokens["metalayer 0 choice 1"][0] == 1).long()
    logits, _ = m.router.module(*seen["router"])
    assert torch.equal(c, logits[0].argmax(-1))  # each token's own top score
    want = torch.empty_like(h)
    for j, u in enumerate(m.choices):
        idx = (c == j).nonzero().flatten()
        torch.testing.assert_close(seen[j][0], h[:, idx])  # its tokens, in their order
        want[:, idx] = u.module(h[:, idx])
    torch.testing.assert_close(m.apply(RunContext(h, "dense", {}), h), want)


@pytest.mark.parametrize("mode", ["infer", "dense"])
def test_a_batch_equals_its_sequences_alone_and_macs_are_exact(model, mode):
    x = random_batch(model, 24)
    out = model(x, mode=mode)
    for i in range(x.shape[0]):
        alone = model(x[i : i + 1], mode=mode)
        n = int((x[i] != 0).sum())
        torch.testing.assert_close(alone.logits[0, :n], out.logits[i, :n], atol=1e-5, rtol=0)
        for name, t in out.trace.tokens.items():
            assert torch.equal(alone.trace.tokens[name][0], t[i])
        assert torch.equal(alone.trace.choices[0], out.trace.choices[i])
    with torch.no_grad(), model.eager(), flop_counter() as fc:
        out = model(x)
    assert fc.get_total_flops() // 2 == int(model.per_input_macs(out.trace, "torch").sum())


def test_the_trace_code_holds_each_sequence_s_counts(model):
    x = random_batch(model, 32)
    out = model(x)
    m = model.metalayers[1]
    for i in range(x.shape[0]):
        counts = token_metalayer.decode(int(out.trace.choices[i, 1]), m.length, 2)
        tokens = out.trace.tokens["metalayer 1 choice 1"][i]
        assert counts == [int((tokens == 0).sum()), int((tokens == 1).sum())]
        assert sum(counts) == int((x[i] != 0).sum())
    text = model.paths.describe(int(out.trace.path_id[0]))
    assert "metalayer 1 tokens choice" in text


def test_a_larger_choice_costs_more_per_token(model):
    x = _full(model, 256)
    x[:] = x[0]  # one sequence; only the forced choices vary
    from dyngraph.forcing import force

    macs = []
    for p in ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0]):
        force(model, "metalayer", p)
        try:
            macs.append(int(model.per_input_macs(model(x[:1]).trace)[0]))
        finally:
            force(model, "metalayer", None)
    assert macs[0] < macs[1] < macs[2]


def test_cost_preference_steers_each_token_away_from_the_large_module(model):
    """One gradient step on Composer's cost term alone lowers every token's probability of
    the large module, the more so the larger gamma."""
    from dyngraph.training.loss import compute_loss

    loaded = dg.load_spec(SPEC)
    stage = loaded.spec.train.stages[1]
    x = _full(model, 128)[:16]
    y = torch.randint(0, 73, x.shape)
    m = model.metalayers[0]

    params = list(m.ctl.parameters())
    before = [p.detach().clone() for p in params]
    try:
        model.train()
        torch.manual_seed(0)
        out = model(x, mode="train")
        _, terms = compute_loss(model, out, x, y, stage, ramp=1.0)
        assert {"route_reinforce", "route_cost"} <= set(terms)
        probs0 = torch.softmax(out.extras["choices"][0]["logits"].detach(), -1)[..., 1]
        cost = stage.metalayer.policy_weight * sum(
            token_metalayer.policy_cost(
                pick, (ml.choice_params / ml.choice_params.max()), pick["gamma"][:, 0]
            )
            for ml, pick in zip(model.metalayers, out.extras["choices"], strict=True)
        )
        model.zero_grad(set_to_none=True)
        cost.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.5 * p.grad
        torch.manual_seed(0)
        again = model(x, mode="train")
        probs1 = torch.softmax(again.extras["choices"][0]["logits"].detach(), -1)[..., 1]
        assert probs1.mean() < probs0.mean() - 1e-3
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)


def test_per_token_reinforce_rewards_each_token_by_its_own_loss(model):
    """The REINFORCE term of a per-token task: a token whose prediction is better than the
    batch's mean makes its own choice likelier, and no other token's."""
    x = _full(model, 64)[:2]
    y = torch.randint(0, 73, x.shape)
    logits = torch.zeros(2, x.shape[1], 73)
    logits[0, 3, y[0, 3]] = 10.0  # one token predicted far better than the rest
    logp = torch.zeros(2, x.shape[1], requires_grad=True)
    pick = {"logp": logp, "valid": torch.ones(2, x.shape[1])}

    class LC:
        pass

    lc = LC()
    lc.model, lc.y = model, y
    lc.out = type("Out", (), {"logits": logits})()
    token_metalayer.reinforce(lc, pick, torch.zeros(2)).backward()
    g = logp.grad
    assert g[0, 3] < 0  # descending the loss raises this token's log-prob
    others = torch.ones_like(g, dtype=torch.bool)
    others[0, 3] = False
    assert (g[others] > 0).all()  # and lowers those of the tokens predicted worse


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "            - {type: residual_mlp, hidden: 16, norm: true}\n",
            "            - {type: pool}\n",
            "keeps one output per token",
        ),
        ("          per: token\n", "          per: tokens\n", "did you mean 'token'"),
    ],
)
def test_bad_token_metalayers_are_one_line_errors(old, new, message):
    text = SPEC.read_text()
    assert old in text
    with pytest.raises(dg.SpecError) as e:
        dg.compile(text.replace(old, new), backend="none")
    assert message in str(e.value) and len(str(e.value).strip().splitlines()) <= 2


def test_one_controller_decides_per_sample_or_per_token():
    text = SPEC.read_text().replace(
        "  - {type: token_classifier, classes: 73}",
        "  - metalayer:\n"
        "      choices: [{type: linear, out: 64}, {type: linear, out: 64}]\n"
        "      controller: ctl\n"
        "  - {type: token_classifier, classes: 73}",
    )
    with pytest.raises(dg.SpecError, match="per sample or per token") as e:
        dg.compile(text, backend="none")
    assert len(str(e.value).strip().splitlines()) <= 2


def test_a_token_metalayer_needs_a_sequence():
    text = """
dyngraph: 1
name: flat
input: {shape: [8]}
task: {type: classification, classes: 2}
controllers:
  ctl: {type: composer_rnn, hidden: 8}
graph:
  - metalayer: {per: token, controller: ctl,
                choices: [{type: linear, out: 8}, {type: linear, out: 8}]}
  - {type: classifier, classes: 2}
"""
    with pytest.raises(dg.SpecError, match="needs a sequence"):
        dg.compile(text, backend="none")
