"""Composer's objective (metalayer.py's `objective`): REINFORCE on the task's likelihood and the
exact expected cost of the chosen modules under a preference gamma, per sample or per token."""

from __future__ import annotations

import torch

from . import token_metalayer


def metalayer_objective(lc) -> dict[str, torch.Tensor]:
    """Composer: maximize log p(y|x,c) + C(p, c, gamma) over the controller's choices.

    The log-likelihood part by REINFORCE with a batch-mean baseline. The cost part,
    C = -sum over `params` preferences of gamma x (chosen module's parameters / the largest
    choice's), is a known function of the choice, so its expectation under the policy,
    sum_c pi(c | x, gamma) C(c), is differentiated exactly (no sampling variance): this is what
    teaches the controller to follow gamma. A `batch_entropy` preference (or `entropy_cost`)
    adds -weight x the entropy of the batch's mean routing, rewarding varied routing. The
    controller reads detached features, so these terms train the controller only (the task
    loss trains the modules)."""
    obj, picks = lc.options, lc.out.extras.get("choices")
    if not picks:
        return {}
    reward = -lc.task_loss(lc.out.logits).detach()  # log p(y|x,c) (classification)
    terms: dict[str, torch.Tensor] = {}
    cost = ent = logp = reinforce = 0.0
    for m, pick in zip(lc.model.metalayers, picks, strict=True):
        tokens = "valid" in pick  # a per-token metalayer (token_metalayer.py)
        gamma, probs = pick["gamma"], torch.softmax(pick["logits"], -1)
        rel = (m.choice_params / m.choice_params.max()).to(probs)
        if tokens:
            h = token_metalayer.routing_entropy(pick)
        else:
            batch = probs.mean(0)
            h = -(batch * batch.clamp_min(1e-8).log()).sum()
        for j, pref in enumerate(m.ctl.preferences.values()):
            if pref.cost != "params":
                ent = ent - gamma[:, j].mean() * h
            elif tokens:
                cost = cost + token_metalayer.policy_cost(pick, rel, gamma[:, j])
            else:
                cost = cost + (gamma[:, j] * (probs * rel).sum(1)).mean()
        if obj.entropy_cost:
            ent = ent - obj.entropy_cost * h
        if tokens:
            reinforce = reinforce + token_metalayer.reinforce(lc, pick, reward)
        else:
            logp = logp + pick["logp"]
    if torch.is_tensor(logp):
        reinforce = reinforce - ((reward - reward.mean()).detach() * logp).mean()
    terms["route_reinforce"] = obj.policy_weight * reinforce
    if torch.is_tensor(cost):
        terms["route_cost"] = obj.policy_weight * cost
    if torch.is_tensor(ent):
        terms["batch_entropy"] = ent
    return terms
