"""`metalayer` with `per: token`: Composer's controller picks one module for each token.

The controller (a `composer_rnn`) scores every token of a sequence: the same cell runs on each
token, its state one per token and carried from metalayer to metalayer, gamma shared by a
sample's tokens. Each choice then runs on the tokens that picked it **as a shorter sequence**
in their original order (as a Mixture-of-Depths gate runs its body, token_gate.py): attention
inside a choice reads only the tokens that picked it, a causal mask follows the original
positions, and no token runs a module it did not pick. A token's output is its choice's output
(Composer's composition, no residual added). Sequences whose counts for a choice differ run in
groups of one count, so a sequence's result and cost are those it has alone, in every mode.

The trace: `trace.choices[:, i]` holds each sequence's counts of tokens per choice (one code,
what its cost follows: `decode` reads it back), `trace.tokens["metalayer i choice j"]` is 1
where a token ran choice j ([B, L], -1 for padding); a sample's MACs of a choice are the
choice's cost at the number of its tokens that picked it.

Training (Composer per token): choices sampled per token (`explore`: a fraction routed at
random); REINFORCE with each token's own log-likelihood as its reward when the task labels
every token, else the sequence's, against a batch-mean baseline; the cost preference's term
(gamma x the chosen module's relative size) averaged over tokens and differentiated exactly.
"""

from __future__ import annotations

import torch

from .. import tasks
from ..runtime.context import draw_scale
from .token_gate import token_groups

# A sequence's decision at a per-token metalayer is recorded as its count of tokens per
# choice, in base L + 1 (L: the longest sequence): code = sum_j count_j (L + 1)^j.


def check(b, site, ctl, n_choices: int) -> bool:
    """Whether a `per: token` metalayer can be built here (a one-line problem if not)."""
    if len(site.in_shape) != 2 or not b.spec.input.is_sequence:
        b.problem(
            site.path + ("per",),
            f"per: token needs a sequence [L, D] here, got {list(site.in_shape)}",
        )
        return False
    per = getattr(ctl, "per_token", None)
    if per is False:
        b.problem(
            site.path + ("per",),
            "a controller decides per sample or per token at every metalayer it serves, not both",
        )
        return False
    if (site.in_shape[0] + 1) ** n_choices >= 2**62:
        b.problem(site.path + ("choices",), f"{n_choices} choices per token are too many to trace")
        return False
    ctl.per_token = True
    return True


def check_choice(b, path: tuple, in_shape: tuple, out: tuple) -> bool:
    """A choice keeps one output per token: [L, D'] from [L, D]."""
    if len(out) == 2 and out[0] == in_shape[0]:
        return True
    b.problem(
        path,
        f"shape mismatch: a per-token choice keeps one output per token: in {list(in_shape)}, "
        f"out {list(out)}",
    )
    return False


def encode(counts: torch.Tensor, length: int) -> torch.Tensor:
    """[b] the code of each sequence's counts per choice [b, C]."""
    base = torch.tensor(
        [(length + 1) ** j for j in range(counts.shape[1])], dtype=torch.long, device=counts.device
    )
    return (counts.long() * base).sum(1)


def decode(code: int, length: int, n_choices: int) -> list[int]:
    """The counts per choice that `encode` made `code` of."""
    out = []
    for _ in range(n_choices):
        code, k = divmod(code, length + 1)
        out.append(k)
    return out


def describe(m, code: int) -> str:
    counts = decode(code, m.length, len(m.choices))
    return f"{m.name} tokens " + "+".join(f"choice{j}×{k}" for j, k in enumerate(counts) if k)


def pick(m, ctx, logits: torch.Tensor) -> torch.Tensor:
    """[b, L] each token's choice: the top score (infer, dense) or sampled (train)."""
    if ctx.mode != "train":
        return logits.argmax(dim=2)
    b, n, k = logits.shape
    probs = torch.softmax(logits.detach().reshape(b * n, k), dim=1)
    c = torch.multinomial(probs, 1).view(b, n)
    explore = m.explore if m.explore_override is None else m.explore_override
    if explore > 0:
        rand = torch.rand(c.shape, device=c.device) < explore
        c = torch.where(rand, torch.randint_like(c, k), c)
    return c


def _run(ctx, unit, x: torch.Tensor, mask: torch.Tensor, out, compacting: bool):
    """The tokens in `mask` [b, L] of `x` [b, L, D] through `unit` (`token_groups`: a call per
    count, or one for a unit without attention), written into their rows of `out` [b·L, D']
    (None: made here)."""
    b, n, d = x.shape
    for rows, flat, k in token_groups(mask, unit.per_token):
        xk = x.reshape(b * n, d).index_select(0, flat)
        y = ctx.call(unit, xk.view(-1, k, d) if k else xk.view(1, -1, d), count=rows)
        y = y.reshape(-1, y.shape[-1])
        if out is None:
            out = (
                y.new_empty((b * n, y.shape[1])) if compacting else y.new_zeros((b * n, y.shape[1]))
            )
        out = out.index_copy_(0, flat, y) if compacting else out.index_copy(0, flat, y)
    return out


def apply(m, ctx, x: torch.Tensor) -> torch.Tensor:
    """The node's output [rows, L, D'] for the current rows (every mode)."""
    b, n = x.shape[:2]
    logits = m.scores(ctx, x)  # [b, L, choices]
    if m.route_all:  # counting costs: every choice runs on every token
        ys = [ctx.call(u, x) for u in m.choices]
        return ys[0]
    c = m.pick(ctx, x, logits)
    masks = [c == j for j in range(len(m.choices))]
    counts = torch.stack([k.sum(1) for k in masks], 1)
    ctx.record("choices", m.index, encode(counts, m.length))
    for unit, mask, j in zip(m.choices, masks, range(len(masks)), strict=True):
        ctx.record_tokens(unit.index, f"{m.name} choice {j}", mask)
    whole = (counts == n).all(0).nonzero().flatten().tolist()
    if whole:  # every token of the batch picked one choice
        y = ctx.call(m.choices[whole[0]], x)
    else:
        out = None
        for unit, mask in zip(m.choices, masks, strict=True):
            out = _run(ctx, unit, x, mask, out, ctx.compacting)
        y = out.view(b, n, -1)
    if ctx.mode == "train":
        logp = torch.log_softmax(logits, dim=2).gather(2, c.unsqueeze(2)).squeeze(2)
        ctx.extras["choices"].append(
            {"logits": logits, "action": c, "logp": logp, "gamma": ctx.states[f"gamma/{m.key}"],
             "params": m.choice_params.to(x.device)[c], "valid": x.new_ones((b, n))}
        )  # fmt: skip
    return y


def reinforce(lc, pick: dict, reward: torch.Tensor) -> torch.Tensor:
    """The REINFORCE loss of one per-token metalayer's choices: each token's own
    log-likelihood as its reward where the task labels tokens (a choice also changes later
    tokens through attention, which this lower-variance estimate leaves out), else its
    sequence's `reward` [B]; a batch-mean baseline."""
    logp, valid = pick["logp"], pick["valid"]
    spec = lc.model.spec.task
    logits = lc.out.logits
    if tasks.per_token(spec) and spec.classifies and logits.shape[1] == logp.shape[1]:
        r = -tasks.token_losses(logits, lc.y).detach()
        labelled = (lc.y != tasks.IGNORE).to(logp) * valid
        n = labelled.sum().clamp_min(1)
        adv = r - (r * labelled).sum() / n
        return -(adv * logp * labelled).sum() / n
    adv = (reward - reward.mean()).detach()
    return -(adv[:, None] * logp * valid).sum(1).mean()


def policy_cost(pick: dict, rel: torch.Tensor, gamma_j: torch.Tensor) -> torch.Tensor:
    """Composer's cost term of one per-token metalayer for one `params` preference: gamma x
    the expected relative size of each token's choice, averaged over tokens."""
    probs, valid = torch.softmax(pick["logits"], 2), pick["valid"]
    per_token = (probs * rel).sum(2)
    return (gamma_j[:, None] * per_token * valid).sum() / valid.sum().clamp_min(1)


def routing_entropy(pick: dict) -> torch.Tensor:
    """The entropy of the batch's mean routing over its tokens."""
    probs, valid = torch.softmax(pick["logits"], 2), pick["valid"]
    batch = (probs * valid.unsqueeze(2)).sum((0, 1)) / valid.sum().clamp_min(1)
    return -(batch * batch.clamp_min(1e-8).log()).sum()


def forced_pick(m, probs: list[float]):
    """Benchmarks and tests: each token's choice drawn with `probs` from its own input."""

    def run(ctx, x, logits):
        v = x[..., 0].detach()
        u = v.abs().mul(draw_scale(200 + m.index)).frac()
        return torch.bucketize(u, m.edges(u, probs), right=True)

    return run
