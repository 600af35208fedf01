"""The halting objectives: ACT's ponder cost, PonderNet's reconstruction and KL to a
geometric prior, Learning to Stop's oracle and imitation terms (halting.py's `objective`)."""

from __future__ import annotations

import torch

from .. import tasks


def _halting_distribution(probs: list[torch.Tensor], rule: str) -> torch.Tensor:
    """[T, B] probability of stopping at each step, from per-step lambda (PonderNet) or pi (L2S);
    the last step takes what is left."""
    out, left = [], torch.ones_like(probs[0])
    for t, p in enumerate(probs):
        stop = left if t == len(probs) - 1 else left * p
        out.append(stop)
        left = left * (1 - p)
    return torch.stack(out)


def _pondernet(lc, h, ex) -> dict[str, torch.Tensor]:
    """PonderNet's two terms, per sample, or per position through time (probs [B, L] per
    step: each labelled position's own distribution and losses, averaged over them)."""
    p = _halting_distribution(ex["probs"], h.rule)  # [T, B] or [T, B, L]
    steps = torch.arange(len(ex["probs"]), dtype=p.dtype, device=p.device)
    prior = h.prior * (1 - h.prior) ** steps
    prior = (prior / prior.sum()).view(-1, *([1] * (p.dim() - 1)))
    kl = (p * (p.clamp_min(1e-10).log() - prior.log())).sum(0)  # [B] or [B, L]
    if p.dim() == 2:
        losses = torch.stack([lc.task_loss(lc.tail(h, s)) for s in ex["states"]])  # [T, B]
        return {"ponder_reconstruction": (p * losses).sum(0).mean(),
                "ponder_kl": h.kl_weight * kl.mean()}  # fmt: skip
    losses = torch.stack([tasks.token_losses(lc.tail(h, s), lc.y) for s in ex["states"]])
    labelled = (lc.y != tasks.IGNORE).to(p)
    n = labelled.sum().clamp_min(1)
    return {
        "ponder_reconstruction": ((p * losses).sum(0) * labelled).sum() / n,
        "ponder_kl": h.kl_weight * (kl * labelled).sum() / n,
    }


def halting_objective(lc) -> dict[str, torch.Tensor]:
    """ACT: task loss + tau x (N + R). PonderNet: sum_n p_n L(y_n) + kl_weight x KL(p || geometric
    prior). L2S: stage I, sum_t q*_t L_t with q* = softmin_t(L_t / beta) (the oracle,
    not back-propagated); stage II, KL(q* || q_phi) for the stop policy; `joint` adds both."""
    terms: dict[str, torch.Tensor] = {}
    for h, ex in zip(lc.model.haltings, lc.out.extras.get("halting") or [], strict=True):
        if h.rule == "act":
            terms[f"ponder_{h.index}"] = h.ponder_cost * ex["ponder"].mean()
            continue
        if h.rule == "pondernet":
            terms.update(_pondernet(lc, h, ex))
            lc.task_replaced = True
            continue
        losses = torch.stack([lc.task_loss(lc.tail(h, s)) for s in ex["states"]])  # [T, B]
        # q* ∝ p(y|t,x)^(1/beta), with log p = -(summed squared error) for regression
        nll = losses.detach() * (lc.y[0].numel() if lc.model.spec.task.type == "regression" else 1)
        q_star = torch.softmax(-nll / h.beta, dim=0)
        stage = lc.options.l2s
        if stage in ("likelihood", "joint"):
            terms["l2s_oracle"] = (q_star * losses).sum(0).mean()
        if stage in ("imitation", "joint"):
            q_phi = _halting_distribution(ex["probs"], h.rule)
            log_ratio = q_star.clamp_min(1e-10).log() - q_phi.clamp_min(1e-10).log()
            terms["l2s_imitation"] = (q_star * log_ratio).sum(0).mean()
        lc.task_replaced = True
    return terms
