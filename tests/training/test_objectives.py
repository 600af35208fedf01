"""Every decision objective term, checked against its paper's formula and where its gradient
goes: SkipNet's and BlockDrop's gate REINFORCE (with BlockDrop's curriculum), Composer's route
REINFORCE and route cost, and L2S's imitation stage.

Each check is one a plausible mistake would break: a reward that is not detached sends policy
gradients into the backbone, a missing baseline or a flipped sign changes the value, a forced
gate that still counts its log-probability changes the value, and a cost that does not follow
gamma stops steering the controller.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dyngraph as dg
from dyngraph.constructs.gate import GATE
from dyngraph.constructs.gate_objective import _hard, gate_objective
from dyngraph.constructs.halting import halting_objective
from dyngraph.spec import schema
from dyngraph.training.batches import Batches
from dyngraph.training.loss import LossContext, compute_loss
from tests.conftest import ROOT

SPECS = ROOT / "specs"


def _model_and_batch(name: str, n: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    loaded = dg.load_spec(SPECS / f"{name}.yaml")
    model = dg.compile(loaded, backend="none").train()
    x, y = Batches(loaded.spec.train).batch(0)
    return model, x[:n], y[:n]


def _stage(**options):
    """A training stage with these construct options (`gate={...}`, `metalayer={...}`)."""
    return schema.StageSpec.model_validate({"steps": 1, **options})


def _curriculum(model, stage, step: int) -> None:
    GATE.before_step(model.gates, stage.gate, step)


def _grads(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def _params(model, *names: str) -> list[torch.nn.Parameter]:
    return [p for u in model.units if u.name in names for p in u.module.parameters()]


def _sampled(model, x):
    for g in model.gates:
        g.mode_override = "sample"
    return model(x, mode="train")


def test_skipnet_gate_reinforce_has_the_papers_reward_and_trains_only_the_gates():
    model, x, y = _model_and_batch("skipnet_ff")
    obj = _stage(gate={"reward": "skipnet", "skipnet_alpha": 0.3, "policy_weight": 0.5})
    torch.manual_seed(1)
    out = _sampled(model, x)
    _, terms = compute_loss(model, out, x, y, obj)
    gates = out.extras["gates"]
    frac = torch.stack([g["action"] for g in gates]).mean(0)
    logp = torch.stack([g["logp"] for g in gates]).sum(0)
    reward = -F.cross_entropy(out.logits, y, reduction="none") - 0.3 * frac
    expected = -0.5 * ((reward - reward.mean()) * logp).mean()
    assert terms["gate_reinforce"] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert "gate_penalty" not in terms  # sampled gates learn from the reward, not the penalty

    # the reward is a detached signal: the policy gradient reaches the gates (and, through
    # what the gates read, the blocks before them), never the head or the last block's body
    torch.manual_seed(1)
    out = _sampled(model, x)
    model.zero_grad()
    gate_objective(LossContext(model, out, x, y, obj.gate))["gate_reinforce"].backward()
    last = len(model.gates) - 1
    assert _grads(_params(model, *(f"gate {i} policy" for i in range(last + 1)))) > 0
    assert _grads(_params(model, f"gate {last} body", model.units[-1].name)) == 0


def test_blockdrop_reinforce_uses_the_greedy_baseline_and_the_curriculum_forces_gates():
    model, x, y = _model_and_batch("blockdrop")
    obj = _stage(gate={"reward": "blockdrop", "blockdrop_gamma": 2.0, "curriculum_steps": 10})
    n = len(model.gates)
    # step 25 with one more learnable gate every 10 steps: the last 3 gates learn, the rest run
    _curriculum(model, obj, step=25)
    assert [g.forced_on for g in model.gates] == [True] * (n - 3) + [False] * 3
    torch.manual_seed(2)
    out = _sampled(model, x)
    _, terms = compute_loss(model, out, x, y, obj)

    gates = out.extras["gates"]
    assert [g["forced"] for g in gates] == [True] * (n - 3) + [False] * 3
    assert all(bool((g["action"] == 1).all()) for g in gates[: n - 3])

    def reward(logits, gs):
        frac = torch.stack([g["action"] for g in gs]).mean(0)  # forced gates count as run
        ok = logits.argmax(1) == y
        return torch.where(ok, 1 - frac.pow(2), torch.full_like(frac, -2.0))

    with torch.no_grad(), _hard(model.gates):
        greedy = model(x, mode="train")
    logp = torch.stack([g["logp"] for g in gates[n - 3 :]]).sum(0)  # free gates only
    advantage = reward(out.logits, gates) - reward(greedy.logits, greedy.extras["gates"])
    expected = -(advantage * logp).mean()
    assert terms["gate_reinforce"] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)

    # the curriculum ends with every gate learnable; before it starts, one is
    _curriculum(model, obj, step=10_000)
    assert not any(g.forced_on for g in model.gates)
    _curriculum(model, obj, step=0)
    assert sum(not g.forced_on for g in model.gates) == 1


def _route_cost(out, rel) -> torch.Tensor:
    """Composer's cost: gamma x the expected parameter fraction under the policy, batch mean."""
    pick = out.extras["choices"][0]
    probs = torch.softmax(pick["logits"], 1)
    return (pick["gamma"][:, 0] * (probs * rel.to(probs)).sum(1)).mean()


def test_composer_route_terms_follow_the_reward_and_gamma():
    model, x, y = _model_and_batch("composer_wide_digits", n=128)
    m = model.metalayers[0]
    rel = m.choice_params / m.choice_params.max()
    assert float(rel.min()) < 0.05 and float(rel.max()) == 1.0  # a small and a large module
    obj = _stage(metalayer={"policy_weight": 0.7})

    torch.manual_seed(3)  # gamma ~ U[0, 8] per sample and the routes are sampled
    out = model(x, mode="train")
    _, terms = compute_loss(model, out, x, y, obj)
    pick = out.extras["choices"][0]
    assert float(pick["gamma"].std()) > 0  # each sample its own gamma
    reward = -F.cross_entropy(out.logits, y, reduction="none")
    expected = -0.7 * ((reward - reward.mean()) * pick["logp"]).mean()
    assert terms["route_reinforce"] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert terms["route_cost"] == pytest.approx(
        0.7 * float(_route_cost(out, rel).detach()), rel=1e-5
    )

    # the cost steers the controller: a step down its gradient moves the expected parameter
    # fraction toward the small module, most where gamma is largest
    before = float(_route_cost(out, rel).detach())
    params = list(m.ctl.parameters())
    grads = torch.autograd.grad(
        terms_cost := 0.7 * _route_cost(out, rel), params, allow_unused=True
    )
    assert terms_cost > 0
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= 0.5 * g
    torch.manual_seed(3)
    with torch.no_grad():
        after = float(_route_cost(model(x, mode="train"), rel))
    assert after < before


def test_l2s_imitation_is_kl_from_the_oracle_which_is_a_target_not_a_path():
    model, x, y = _model_and_batch("l2s_lista")
    h = model.haltings[0]
    out = model(x, mode="train")
    _, terms = compute_loss(model, out, x, y, _stage(halting={"l2s": "imitation"}))
    assert set(terms) == {"l2s_imitation"}  # stage II: no likelihood term, no task loss

    ex = out.extras["halting"][0]
    # the oracle q*_t ∝ p(y | t, x)^(1/beta), log p = -(summed squared error)
    sse = torch.stack([(model.tail(h, s) - y).pow(2).flatten(1).sum(1) for s in ex["states"]])
    q_star = torch.softmax(-sse / h.beta, 0)
    # the policy's stopping distribution: stop at t after continuing through 1..t-1
    probs, left, q_phi = ex["probs"], torch.ones_like(ex["probs"][0]), []
    for t, p in enumerate(probs):
        q_phi.append(left if t == len(probs) - 1 else left * p)
        left = left * (1 - p)
    q_phi = torch.stack(q_phi)
    torch.testing.assert_close(q_phi.sum(0), torch.ones_like(q_phi[0]))
    kl = (q_star * (q_star.clamp_min(1e-10).log() - q_phi.clamp_min(1e-10).log())).sum(0).mean()
    assert terms["l2s_imitation"] == pytest.approx(float(kl.detach()), rel=1e-4)
    assert terms["l2s_imitation"] >= 0

    # the oracle is a target, not a path: the gradient, into the policy and the layers it
    # reads, is that of the cross-entropy -sum q* log q_phi with q* held fixed
    params = [p for p in model.parameters()]
    kl_term = halting_objective(
        LossContext(model, out, x, y, _stage(halting={"l2s": "imitation"}).halting)
    )
    got = torch.autograd.grad(
        kl_term["l2s_imitation"], params, retain_graph=True, materialize_grads=True
    )
    ce = -(q_star.detach() * q_phi.clamp_min(1e-10).log()).sum(0).mean()
    want = torch.autograd.grad(ce, params, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in got) > 0
