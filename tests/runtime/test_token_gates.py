"""Per-token gates (Mixture-of-Depths): the top c·L tokens of each sequence (or those over a
threshold) run the body as a shorter sequence, scaled by the router's weight; the rest pass
by; a batch equals its sequences alone; each sequence's MACs are exact."""

from __future__ import annotations

import math

import pytest
import torch

import dyngraph as dg
from dyngraph.cost import flop_counter
from dyngraph.export import export, load_exported
from dyngraph.runtime import kernels

from ..conftest import ROOT, compiled, diversify, random_batch

SPEC = ROOT / "specs" / "mod_tagger.yaml"
C = 0.125  # its gates' capacity


def _variant(**gate) -> str:
    """mod_tagger's text with its gates' options replaced."""
    text = SPEC.read_text()
    old = "          capacity: 0.125\n"
    new = "".join(f"          {k}: {v}\n" for k, v in gate.items())
    return text.replace(old, new)


@pytest.fixture(scope="module")
def model():
    return compiled(SPEC, "none")


@pytest.fixture(scope="module")
def threshold_model():
    torch.manual_seed(0)
    m = dg.compile(_variant(threshold=0.5), backend="none").eval()
    diversify(m)  # routers whose probabilities spread around 0.5
    return m


def _capture(unit):
    """The shapes of the inputs `unit` is called on (a wrapper on its function)."""
    seen, fn = [], unit.fn
    call = fn if fn is not None else unit.module

    def run(*args):
        seen.append(tuple(args[0].shape))
        return call(*args)

    unit.fn = run
    return seen, lambda: setattr(unit, "fn", fn)


def test_capacity_routes_the_top_k_tokens_through_a_shorter_sequence(model):
    x = random_batch(model, 16)
    lengths = (x != 0).sum(1)
    gate = model.gates[0]
    seen, restore = _capture(gate.body)
    probs, restore_p = _capture(gate.policy)
    try:
        out = model(x)
    finally:
        restore(), restore_p()
    routed = out.trace.tokens["gate 0"]
    for i, n in enumerate(lengths.tolist()):
        k = math.ceil(C * n)
        assert (routed[i, :n] == 1).sum() == k and (routed[i, n:] == -1).all()
        assert out.trace.gates[i, 0] == k
    # the body ran on sequences of k tokens, one call per length group: never on n tokens
    assert sorted(s[1] for s in seen) == sorted(math.ceil(C * n) for n in lengths.unique())
    assert sum(s[0] for s in seen) == x.shape[0]


def test_tied_router_probabilities_route_the_earliest_tokens_on_every_path(tmp_path):
    """Equal router probabilities (routers of zeros: 0.5 for every token) route each
    sequence's first k tokens at every gate, whichever path runs it: infer with the fused
    kernel or without, dense, and an export's runner (whose outputs then agree)."""
    torch.manual_seed(0)
    m = dg.compile(SPEC, backend="none").eval()
    for g in m.gates:
        for prm in g.policy.module.parameters():
            prm.data.zero_()
    x = random_batch(m, 12, seed=3)
    lengths = (x != 0).sum(1).tolist()
    with kernels.disabled():
        aten = m(x)
    runs = {"infer": m(x), "aten": aten, "dense": m(x, mode="dense")}
    for name, out in runs.items():
        for g in range(len(m.gates)):
            routed = out.trace.tokens[f"gate {g}"] == 1
            for i, n in enumerate(lengths):
                first = torch.arange(math.ceil(C * n)).tolist()
                assert routed[i].nonzero().flatten().tolist() == first, (name, g, i)
    runner = load_exported(export(m, tmp_path / "export"))
    torch.testing.assert_close(runner(x).logits, runs["infer"].logits, atol=1e-5, rtol=1e-4)


def test_output_is_the_scaled_body_on_routed_tokens_and_identity_elsewhere(model):
    x = random_batch(model, 64)
    seq = x[(x != 0).all(1)][:1]  # one full-length sequence
    gate = model.gates[0]
    seen = {}

    def keep(unit, key):
        def run(*args):
            seen[key] = args[0]
            return unit.module(*args)

        return run

    saved = gate.body.fn, gate.policy.fn
    gate.body.fn, gate.policy.fn = keep(gate.body, "body"), keep(gate.policy, "h")
    try:
        out = model(seq, mode="dense")
    finally:
        gate.body.fn, gate.policy.fn = saved
    h = seen["h"]  # what the gate read
    p = gate.policy.module(h)
    routed = out.trace.tokens["gate 0"][0] == 1
    top = p[0].topk(int(routed.sum())).indices.sort().values
    assert torch.equal(routed.nonzero().flatten(), top)  # the k most probable tokens
    xk = h[:, top]
    torch.testing.assert_close(seen["body"], xk)  # a shorter sequence in the original order
    want = h.clone()
    want[:, top] = xk + p[:, top, None] * (gate.body.module(xk) - xk)
    got = gate.apply(_ctx(h), h)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, ~routed], h[:, ~routed])  # unrouted tokens pass unchanged


def _ctx(x):
    from dyngraph.runtime.context import RunContext

    return RunContext(x, "dense", {})


def test_threshold_routing_varies_per_sequence_and_matches_alone(threshold_model):
    m = threshold_model
    x = random_batch(m, 24)
    out = m(x)
    counts = out.trace.gates[:, 0]
    assert counts.unique().numel() > 2  # sequences route different numbers of tokens
    for i in range(x.shape[0]):
        alone = m(x[i : i + 1])
        for name, t in out.trace.tokens.items():
            assert torch.equal(alone.trace.tokens[name][0], t[i])
        n = int((x[i] != 0).sum())
        torch.testing.assert_close(alone.logits[0, :n], out.logits[i, :n], atol=1e-5, rtol=0)
    with torch.no_grad(), m.eager(), flop_counter() as fc:
        out = m(x)
    assert fc.get_total_flops() // 2 == int(m.per_input_macs(out.trace, "torch").sum())


def test_macs_follow_the_routed_counts(threshold_model):
    m = threshold_model
    x = random_batch(m, 32)
    x[:, :] = x[0]  # one length; vary only the routing
    out = m(x)
    macs = m.per_input_macs(out.trace)
    routed = out.trace.gates.sum(1)
    order = routed.argsort()
    assert (macs[order].diff() >= 0).all()
    # a sequence routing no token through either body costs the static layers and routers only
    body = [g.body.index for g in m.gates]
    assert (out.trace.unit_counts[routed == 0][:, body] == 0).all()


def test_predictor_decides_causally_and_top_k_does_not(model):
    x = random_batch(model, 64)
    x = x[(x != 0).all(1)][:16]  # full-length sequences
    later = x.clone()
    later[:, -1] = later[:, -1] % 6 + 1  # change only the last token
    for decode in (False, True):
        model.set_decode(decode)
        try:
            a, b = model(x).trace.tokens, model(later).trace.tokens
        finally:
            model.set_decode(False)
        same = all(torch.equal(a[k][:, :-1], b[k][:, :-1]) for k in a)
        assert same == decode  # the predictor never reads a later token; the top-k does


def test_router_learns_through_the_scaled_output(model):
    model.train()
    try:
        out = model(random_batch(model, 16), mode="train")
        out.logits.pow(2).mean().backward()
        router = model.gates[0].policy.module
        assert router.net[-1].weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("per: token\n", "per: sample\n", "capacity is for per: token gates"),
        ("policy: {type: token_router}", "policy: {type: ff_gate}", "is a token_router"),
        ("\n          per: token", "\n          per: tokens", "did you mean 'token'"),
    ],
)
def test_bad_token_gates_are_one_line_errors(old, new, message):
    with pytest.raises(dg.SpecError) as e:
        dg.compile(SPEC.read_text().replace(old, new), backend="none")
    assert message in str(e.value) and len(str(e.value).strip().splitlines()) <= 2


def test_a_token_gate_needs_a_sequence():
    text = """
dyngraph: 1
name: flat
input: {shape: [8]}
task: {type: classification, classes: 2}
graph:
  - gate: {per: token, capacity: 0.5, body: {type: linear, out: 8}, policy: {type: token_router}}
  - {type: classifier, classes: 2}
"""
    with pytest.raises(dg.SpecError, match="token_router reads a sequence|needs a sequence"):
        dg.compile(text, backend="none")


def test_decoding_needs_a_predictor(threshold_model):
    text = _variant(capacity=0.25).replace(
        "          predictor: {type: token_router, hidden: 32}\n", ""
    )
    m = dg.compile(text, backend="none")
    with pytest.raises(ValueError, match="no per-token gate of this model has a predictor"):
        m.set_decode(True)


def test_threshold_gates_train_with_a_compute_penalty(threshold_model):
    from dyngraph.training.loss import compute_loss

    m = threshold_model
    text = _variant(threshold=0.5).replace("schedule: {type: onecycle}}", "gate: {penalty: 0.5}}")
    stage = dg.load_spec(text).spec.train.stages[0]
    x = random_batch(m, 16)
    y = torch.randint(0, 5, x.shape)
    m.train()
    try:
        out = m(x, mode="train")
        _, terms = compute_loss(m, out, x, y, stage, ramp=1.0)
    finally:
        m.eval()
    # lambda x the mean router probability: fewer tokens routed, less compute
    assert "gate_penalty" in terms and terms["gate_penalty"] > 0


def test_a_body_without_attention_runs_every_routed_token_in_one_call():
    """A per-token body (an MLP) needs no sequence: the routed tokens of every sequence run
    in one call, with the results, trace and MACs of each sequence alone."""
    text = _variant(threshold=0.5).replace(
        "          body: {type: transformer_block, heads: 4, mlp_ratio: 2, causal: true}\n",
        "          body: {type: residual_mlp, hidden: 32, norm: true}\n",
    )
    torch.manual_seed(0)
    m = dg.compile(text, backend="none").eval()
    diversify(m)
    gate = m.gates[0]
    assert gate.body.per_token and not m.units[1].per_token  # an MLP, not attention
    x = random_batch(m, 24)
    seen, restore = _capture(gate.body)
    try:
        out = m(x)
    finally:
        restore()
    routed = out.trace.tokens["gate 0"]
    # one call per length group (a batch runs each length as its own pass), never per count
    assert all(s[0] == 1 for s in seen) and sum(s[1] for s in seen) == int((routed == 1).sum())
    assert len(seen) <= len((x != 0).sum(1).unique())
    for i in range(x.shape[0]):
        alone = m(x[i : i + 1])
        assert torch.equal(alone.trace.tokens["gate 0"][0], routed[i])
        n = int((x[i] != 0).sum())
        torch.testing.assert_close(alone.logits[0, :n], out.logits[i, :n], atol=1e-5, rtol=0)
    dense = m(x, mode="dense")
    torch.testing.assert_close(dense.logits, out.logits, atol=1e-5, rtol=0)
    with torch.no_grad(), m.eager(), flop_counter() as fc:
        out = m(x)
    assert fc.get_total_flops() // 2 == int(m.per_input_macs(out.trace, "torch").sum())
