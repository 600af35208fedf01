"""The gates' objective: a compute penalty on straight-through or soft gates, and REINFORCE
for sampled ones with SkipNet's or BlockDrop's reward (gate.py's `objective`)."""

from __future__ import annotations

import contextlib

import torch

from . import token_gate


def gate_objective(lc) -> dict[str, torch.Tensor]:
    """Compute penalty on the gates (straight-through or soft), and REINFORCE for sampled
    gates: SkipNet's reward -CE - alpha x fraction run with a batch-mean baseline, or BlockDrop's
    1 - (used/K)^2 if correct else -gamma with a self-critical (greedy) baseline."""
    obj, gates = lc.options, lc.out.extras.get("gates")
    terms = token_gate.predictor_loss(lc)
    free = [g for g in gates or [] if not g["forced"]]
    if not free:
        return terms
    soft = [g for g in free if g["mode"] != "sample"]
    if soft and obj.penalty:
        terms["gate_penalty"] = (
            lc.ramp * obj.penalty * torch.stack([g["gate"] for g in soft]).mean()
        )
    sampled = [g for g in free if g["mode"] == "sample"]
    if sampled:
        acts = torch.stack([g["action"] for g in gates])  # [G, B], forced gates count as run
        frac = acts.mean(0)
        logp = torch.stack([g["logp"] for g in sampled]).sum(0)
        if obj.reward == "skipnet":
            reward = -lc.task_loss(lc.out.logits).detach() - obj.skipnet_alpha * frac
            baseline = reward.mean()
        else:
            reward = blockdrop_reward(lc, lc.out.logits, frac, obj)
            with torch.no_grad():  # self-critical: the greedy decisions' reward
                with _hard(lc.model.gates):
                    greedy = lc.model(lc.x, mode="train")
                gfrac = torch.stack([g["action"] for g in greedy.extras["gates"]]).mean(0)
                baseline = blockdrop_reward(lc, greedy.logits, gfrac, obj)
        terms["gate_reinforce"] = -obj.policy_weight * ((reward - baseline).detach() * logp).mean()
    return terms


def blockdrop_reward(lc, logits, frac, obj) -> torch.Tensor:
    correct = lc.correct(logits)
    return torch.where(
        correct, 1 - frac.pow(2), torch.full_like(frac, -obj.blockdrop_gamma)
    ).detach()


@contextlib.contextmanager
def _hard(gates: list):
    """Every gate decides hard for a while (BlockDrop's self-critical baseline)."""
    saved = [g.mode_override for g in gates]
    for g in gates:
        g.mode_override = "hard"
    try:
        yield
    finally:
        for g, m in zip(gates, saved, strict=True):
            g.mode_override = m
