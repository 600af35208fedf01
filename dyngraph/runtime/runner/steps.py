"""The runner's steps (runtime/runner): what each kind of step of a manifest does to a pass
over rows (state.py), as dyngraph's infer mode does (rows that leave at an exit are compacted
away, a gated body runs on the rows whose gate is on, a metalayer's choices each on the rows
that chose them). Imports nothing but torch."""

from __future__ import annotations

import math

import torch

from .fused import AT_LEAST, FLOATS, RULES
from .state import Pass


def _choices_per_token(p: Pass, s: dict, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Composer per token (constructs/token_metalayer.py): each choice runs on the tokens that
    picked it as a shorter sequence, each sequence charged the choice at its count; the trace
    records each sequence's counts per choice as one code (base L + 1)."""
    b, n, d = x.shape
    masks = [c == j for j in range(len(s["choices"]))]
    counts = torch.stack([m.sum(1) for m in masks], 1)
    base = torch.tensor([(s["length"] + 1) ** j for j in range(counts.shape[1])])
    p.record("choices", s["index"], (counts.cpu() * base).sum(1))
    for u, k in zip(s["choices"], counts.unbind(1), strict=True):
        p.routed.append((u, p.idx, k))
    whole = (counts == n).all(0).nonzero().flatten().tolist()
    if whole:  # every token of the pass picked one choice
        return p.call(s["choices"][whole[0]], x)
    out = None
    for u, mask, per_token in zip(s["choices"], masks, s["per_token"], strict=True):
        for rows, flat, k in _token_groups(mask, per_token):
            xk = x.reshape(b * n, d).index_select(0, flat)
            y = p.call(u, xk.view(-1, k, d) if k else xk.view(1, -1, d), rows=rows)
            y = y.reshape(-1, y.shape[-1])
            out = y.new_empty((b * n, y.shape[1])) if out is None else out
            out.index_copy_(0, flat, y)
    return out.view(b, n, -1)


def _token_gate(p: Pass, s: dict) -> None:
    """Mixture-of-Depths (constructs/token_gate.py): the router scores each token; the top
    capacity·L of each sequence (or every token over the threshold, or while decoding those
    the causal predictor picks) run the body as a shorter sequence, in order, their update
    scaled by the router's weight; the others pass by."""
    x = p.env[s["reads"][0]]
    b, n, d = x.shape
    prob = p.call(s["policy"], x)
    if s.get("decode"):  # routed by the causal predictor (decoding): p >= 0.5
        mask = p.call(s["predictor"], x) >= 0.5
        p.record("gates", s["index"], mask.sum(1))
        groups = _token_groups(mask, s["per_token"])
    elif s["capacity"] is not None:
        k = min(n, math.ceil(s["capacity"] * n - 1e-9))
        # (ties to the earlier position, as constructs/token_gate.top_positions)
        idx = prob.sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        mask = torch.zeros_like(prob, dtype=torch.bool).scatter_(1, idx, True)
        p.record("gates", s["index"], k)
        flat = (idx + torch.arange(b, device=x.device).unsqueeze(1) * n).view(-1)
        groups = [(None, flat, k)]
    else:
        mask = prob >= s["threshold"]
        p.record("gates", s["index"], mask.sum(1))
        groups = _token_groups(mask, s["per_token"])
    p.routed.append((s["body"], p.idx, mask.sum(1)))
    out, rows_d = x.clone(), x.reshape(b * n, d)
    for rows, flat, k in groups:
        xk = rows_d.index_select(0, flat)
        y = p.call(s["body"], xk.view(-1, k, d) if k else xk.view(1, -1, d), rows=rows)
        w = prob.reshape(-1).index_select(0, flat).unsqueeze(1)
        out.view(b * n, d).index_copy_(0, flat, torch.lerp(xk, y.reshape(-1, d), w))
    p.env[s["writes"]] = out


def _token_groups(mask: torch.Tensor, per_token: bool) -> list[tuple]:
    """(rows, their tokens' rows of [b·L, D], tokens per row) per body call: every routed
    token in one call for a body that acts per token, else sequences grouped by their count
    (constructs/token_gate.py: token_groups)."""
    b, n = mask.shape
    counts = mask.sum(1)
    if per_token:
        return [(torch.where(counts > 0)[0], mask.reshape(-1).nonzero().flatten(), None)]
    groups = []
    for k in sorted(set(counts.tolist()) - {0}):
        rows = torch.where(counts == k)[0]
        idx = mask.index_select(0, rows).nonzero()[:, 1].view(-1, k)
        groups.append((rows, (idx + rows.unsqueeze(1) * n).view(-1), k))
    return groups


def _segment(p: Pass, s: dict) -> None:
    outs = p.call(s["unit"], *[p.env[r] for r in s["reads"]])
    for k, v in zip(s["outputs"], outs, strict=True):
        p.env[k] = v


def _stays(p: Pass, s: dict, z: torch.Tensor) -> torch.Tensor:
    """Which rows go on past a (not last) exit: the criterion of constructs/exit_criteria.py."""
    kind, t = s["criterion"], s["temperature"]
    if kind == "max_prob":
        zt = z if t == 1.0 else z / t
        score = (zt - zt.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_()
        return score < s["threshold"]
    if kind == "entropy":
        q = torch.softmax(z if t == 1.0 else z / t, dim=1)
        return -(q * torch.log(q.clamp_min(1e-12))).sum(dim=1) > s["threshold"]
    pred = z.argmax(dim=1)  # patience (PABEE)
    prev, count = p.states.get("exit/pred"), p.states.get("exit/count")
    count = torch.zeros_like(pred) if prev is None else torch.where(pred == prev, count + 1, 0)
    p.states["exit/pred"], p.states["exit/count"] = pred, count
    return count < s["patience"]


def _exit(p: Pass, s: dict) -> None:
    z = p.call(s["head"], p.env[s["reads"][0]])
    k, rule = p.k, RULES.get(s["criterion"])
    if s["last"]:
        stay = z.new_zeros(0, dtype=torch.long)
    elif k is not None and rule is not None and z.dtype in FLOATS and z.is_contiguous():
        stay = k.rows_where(z, rule, s["threshold"], s["temperature"])  # (one call)
    else:
        stay = torch.where(_stays(p, s, z))[0]
    if stay.shape[0] == p.rows:  # nobody leaves here
        return
    p.leave(z, s["index"])  # (rows that stay are written again where they leave)
    if stay.shape[0]:
        p.keep(stay, s["live_after"])
    else:
        p.rows = 0


def _gate(p: Pass, s: dict) -> None:
    x = p.env[s["reads"][0]]
    if s["style"] == "ff":
        prob = p.call(s["policy"], x)
    elif s["style"] == "recurrent":
        h = p.states.get(s["key"])
        if h is None:
            h = x.new_zeros((x.shape[0], *s["state_shape"]))
        prob, p.states[s["key"]] = p.call(s["policy"], x, h)
    else:  # one-shot: the policy runs once, at its first gate
        if s["column"] == 0:
            p.states[s["key"]] = p.call(s["policy"], p.env[s["reads"][1]])
        prob = p.states[s["key"]][:, s["column"]]
    n, k = x.shape[0], p.k
    scores, col = (p.states[s["key"]], s["column"]) if s["style"] == "oneshot" else (prob, 0)
    if k is not None and scores.dtype in FLOATS and scores.is_contiguous():
        run = k.rows_where(scores, AT_LEAST, s["threshold"], col)  # (one call)
        p.record("gates", s["index"], lambda: torch.zeros(n, dtype=torch.bool).index_fill_(
            0, run.cpu(), True))  # fmt: skip
    else:
        on = prob >= s["threshold"]
        p.record("gates", s["index"], on)
        run = torch.where(on)[0]
    if run.shape[0] == n:
        y = p.call(s["body"], x)
    elif run.shape[0] == 0:
        y = x
    else:
        y = x.clone()
        p.put(y, run, p.call(s["body"], x.index_select(0, run), rows=run))
    p.env[s["writes"]] = y


def _halting(p: Pass, s: dict) -> None:
    out, steps = _ponder(p, s, p.env[s["reads"][0]], None)
    p.record("steps", s["index"], steps)
    p.env[s["writes"]] = out


def _halting_time(p: Pass, s: dict) -> None:
    """Halting through time (`carry: true`, constructs/halting_time.py): at every position of
    the sequence the loop ponders from the previous position's output; each sample's steps
    are the sum over its positions."""
    x = p.env[s["reads"][0]]
    h, outs, total = None, [], 0
    for t in range(x.shape[1]):
        h, steps = _ponder(p, s, x[:, t], h)
        outs.append(h)
        total = total + steps
    p.record("steps", s["index"], total)
    p.env[s["writes"]] = torch.stack(outs, 1)


def _ponder(p: Pass, s: dict, x: torch.Tensor, h0: torch.Tensor | None) -> tuple:
    """A step applied until each row halts (constructs/halting.py's infer loop): ACT's
    halting sum, PonderNet's probability of having halted, or L2S's stop policy; halted rows
    leave the loop, their output (ACT: the halting-weighted mean of the states) written once.
    Returns (output, steps per row); `h0`: the initial state (else init, or zeros)."""
    n, rule, last = x.shape[0], s["rule"], s["max_steps"] - 1
    init = s["init"]
    if h0 is not None:
        h = h0
    else:
        h = p.call(init, x) if init is not None else x.new_zeros((n, *s["state_shape"]))
    out, steps = torch.empty_like(h), torch.empty(n, dtype=torch.long)
    carry = x.new_ones(n) if rule == "pondernet" else x.new_zeros(n)
    acc = torch.zeros_like(h) if rule == "act" else None
    pos, xa = None, x  # the rows still in the loop (positions among the pass's rows)
    for t in range(s["max_steps"]):
        unit = s["steps"][t if len(s["steps"]) > 1 else 0]
        flag = [xa.new_full((xa.shape[0], 1), 1.0 if t == 0 else 0.0)] if s["flag"] else []
        prev, h = h, p.call(unit, h, xa, *flag, rows=pos)
        if rule == "act":
            q = p.call(s["unit"], h, rows=pos)
            new_carry = carry + q
            halt = new_carry >= 1 - s["epsilon"]
        elif rule == "l2s":
            onehot = xa.new_zeros((xa.shape[0], s["max_steps"]))
            onehot[:, t] = 1.0
            q = p.call(s["unit"], xa, h, prev, onehot, rows=pos)
            halt, new_carry = q >= s["threshold"], carry
        else:  # pondernet
            q = p.call(s["unit"], h, rows=pos)
            new_carry = carry * (1 - q)
            halt = 1 - new_carry >= s["threshold"]
        if t == last:
            halt = torch.ones_like(halt)
        if acc is not None:
            w = torch.where(halt, 1 - carry, q)
            acc = torch.addcmul(acc, w.view(-1, *([1] * (h.dim() - 1))), h)
        res = acc if acc is not None else h
        going = torch.where(halt)[0]
        if going.shape[0]:
            rows = going if pos is None else pos.index_select(0, going)
            out.index_copy_(0, rows, res.index_select(0, going))
            steps.index_fill_(0, rows, t + 1)
            stay = torch.where(~halt)[0]
            if stay.shape[0] == 0:
                break
            pos = stay if pos is None else pos.index_select(0, stay)
            h, xa, new_carry = h[stay], xa[stay], new_carry[stay]
            acc = None if acc is None else acc[stay]
        carry = new_carry
    return out, steps


def _metalayer(p: Pass, s: dict) -> None:
    """Composer: the controller scores the choices from the rows, its state and the test-time
    preferences (gamma); each row runs its top choice, rows grouped by choice
    (constructs/metalayer.py's infer pass)."""
    x = p.env[s["reads"][0]]
    n = x.shape[0]
    h = p.states.get(s["key"])
    if h is None:  # (the controller's state goes on to its next metalayer; per token: one each)
        h = x.new_zeros((*x.shape[: 2 if s["per"] == "token" else 1], *s["state_shape"]))
    g = torch.tensor(s["gamma"], dtype=x.dtype, device=x.device).expand(n, len(s["gamma"]))
    logits, p.states[s["key"]] = p.call(s["router"], x, h, g)
    if s["per"] == "token":
        p.env[s["writes"]] = _choices_per_token(p, s, x, logits.argmax(dim=2))
        return
    c = logits.argmax(dim=1)
    p.record("choices", s["index"], c)
    counts = torch.bincount(c, minlength=len(s["choices"])).tolist()
    if max(counts) == n:
        p.env[s["writes"]] = p.call(s["choices"][counts.index(n)], x)
        return
    order, y, start = torch.sort(c, stable=True).indices, None, 0
    for u, k in zip(s["choices"], counts, strict=True):
        if k:
            rows = order[start : start + k]
            out = p.call(u, x.index_select(0, rows), rows=rows)
            y = out.new_empty((n, *out.shape[1:])) if y is None else y
            y.index_copy_(0, rows, out)
            start += k
    p.env[s["writes"]] = y


STEPS = {"segment": _segment, "exit": _exit, "gate": _gate, "halting": _halting,
         "halting_time": _halting_time,
         "metalayer": _metalayer, "token_gate": _token_gate}  # fmt: skip
