"""Sequences of different lengths in one batch: each length runs as its own group.

A padded position executes nothing: the batch is split into groups of one length, each group
runs at its own length (no padding, no mask), and the outputs, traces and extras are put back
in the batch's order. A sequence's decisions and outputs are therefore those it gets alone,
and its MACs are those of its own length (per-length unit costs, `LengthCosts`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import kernels


def checked_ids(x: torch.Tensor, vocab: int, length: int, device, name: str) -> torch.Tensor:
    """Token ids [B, `length`] as int64 in [0, vocab) on `device` (None: any), or a one-line
    error. The range is found in one pass (the fused kernel, on a CPU: no tensor to read back);
    the rows out of it are named by ATen ops, only when there are some."""
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected token ids (an integer tensor), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: the ids are on {x.device}, the model on {device}")
    if x.dim() != 2 or x.shape[1] != length:
        raise ValueError(f"{name}: expected ids [B, {length}], got {list(x.shape)}")
    x = x if x.dtype == torch.long else x.long()
    k = kernels.for_device(x.device)
    if not x.numel():
        lo, hi = 0, 0
    elif k is not None and x.is_contiguous():
        lo, hi = k.id_range(x)
    else:
        lo, hi = (int(v) for v in torch.aminmax(x))
    if lo < 0 or hi >= vocab:
        bad = ((x < 0) | (x >= vocab)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name}: rows {bad[:8]} hold ids outside [0, {vocab})")
    return x


def lengths_of(
    x: torch.Tensor, pad_id: int | None, given: Any, name: str
) -> tuple[torch.Tensor, bool]:
    """([B] the length of each sequence of a batch `x` [B, L, ...], whether all are L): `given`
    (a tensor or list), else for token ids the positions before the trailing `pad_id`s, else
    L. One-line errors for padding inside a sequence, an empty sequence or lengths out of
    range."""
    b, full = x.shape[0], x.shape[1]
    if given is not None:
        lengths = torch.as_tensor(given, device=x.device)
        if lengths.shape != (b,) or lengths.is_floating_point():
            raise ValueError(f"{name}: lengths must be {b} integers, got {list(lengths.shape)}")
        lengths = lengths.long()
        bad = ((lengths < 1) | (lengths > full)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name}: lengths must lie in [1, {full}]; rows {bad[:8]} have "
                f"{lengths[bad[:8]].tolist()}"
            )
        return lengths, bool((lengths == full).all())
    if pad_id is None:
        return torch.full((b,), full, dtype=torch.long, device=x.device), True
    k = kernels.for_device(x.device)
    if k is not None and x.dim() == 2 and x.dtype == torch.long and x.is_contiguous():
        lengths, ok, whole = k.pad_lengths(x, pad_id)  # (one pass; the ATen ops below name
        if ok:  # the rows, only when one is wrong)
            return lengths, whole
    real = x != pad_id
    lengths = real.sum(1)
    # padding only at the end: no token right after a pad; and no sequence empty (a few ops
    # on the hot path, the rows named only when one is wrong)
    inside = real[:, 1:] & ~real[:, :-1]
    if bool(inside.any()) or bool((lengths == 0).any()):
        bad = inside.any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name}: rows {bad[:8]} hold pad_id {pad_id} before a token; pad at the end only"
            )
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"{name}: rows {empty[:8]} are all padding (a sequence needs a token)")
    return lengths, bool((lengths == full).all())


def groups(lengths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(length, row indices) of each distinct length, shortest first."""
    return [(int(n), (lengths == n).nonzero().flatten()) for n in lengths.unique().tolist()]


def merge(parts: list[Any], order: torch.Tensor, full: int) -> Any:
    """One value from the values of each group (in group order): tensors with a batch
    dimension are concatenated and put back in row order (`order`: each row's place in the
    concatenation); per-token tensors [b, l, ...] (their groups differ in dimension 1) are
    padded with zeros to length `full` first. Lists and dicts are merged item by item;
    anything else is taken from the first group."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: merge([p[k] for p in parts], order, full) for k in first}
    if isinstance(first, list | tuple):
        if any(len(p) != len(first) for p in parts):
            raise ValueError(
                "sequences of different lengths took different numbers of steps in train "
                "mode; train on batches of one length"
            )
        return type(first)(merge(list(p), order, full) for p in zip(*parts, strict=True))
    if not torch.is_tensor(first) or first.dim() == 0:
        return first
    if first.dim() >= 2 and any(p.shape[1:] != first.shape[1:] for p in parts):
        parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, full - p.shape[1])) for p in parts]
    return torch.cat(parts).index_select(0, order)


@torch.no_grad()
def unit_inputs(model, length: int) -> dict[int, tuple]:
    """Each unit's inputs (by unit index) in a dense pass of `model` over one sequence of
    `length`: what its cost at that length is counted on. Dense mode runs every unit."""
    pad, vocab = model._seq
    if vocab is not None:
        x = torch.full((1, length), 2 if pad == 1 else 1, dtype=torch.long)
    else:
        x = torch.zeros(1, length, *model._in_shape[1:])
    ref = model._ref[0] if model._ref else None
    if ref is not None:
        x = x.to(ref.device) if vocab is not None else x.to(ref)
    seen: dict[int, tuple] = {}
    saved = [u.fn for u in model.units]

    def recorder(u):
        def run(*args):
            seen.setdefault(u.index, tuple(a.clone() for a in args))
            return u.module(*args)

        return run

    was = model.training
    # a per-token node (a Mixture-of-Depths gate) runs its body on every token here, so that
    # the body is counted at `length` too (its cost at k routed tokens is read at length k)
    routing = [s for s in model._plan.steps if hasattr(s, "route_all")]
    for u in model.units:
        u.fn = recorder(u)
    for s in routing:
        s.route_all = True
    try:
        model.eval()
        model._forward(x, "dense", None)
    finally:
        model.train(was)
        for s in routing:
            s.route_all = False
        for u, fn in zip(model.units, saved, strict=True):
            u.fn = fn
    return seen


class LengthCosts:
    """Per-unit MACs as a function of the sequence length.

    A unit's cost at length l is counted on the inputs it gets in a dense pass of one sample of
    length l (`inputs_at(l)`). Built-in blocks cost a + b·l + c·l² (attention is quadratic), so
    three counts fix the polynomial; a fourth, at the longest length, checks it, and a unit
    that fails the check is counted at every length it meets.
    """

    def __init__(self, inputs_at, count, n_units: int, longest: int):
        self._inputs_at, self._count, self._n, self._longest = inputs_at, count, n_units, longest
        self._exact: dict[int, list[int]] = {}
        self._poly: list[tuple[int, int, int] | None] | None = None

    def _at(self, n: int) -> list[int]:
        if n not in self._exact:
            self._exact[n] = self._count(self._inputs_at(n))
        return self._exact[n]

    def macs(self, n: int) -> list[int]:
        """[U] MACs of every unit for one sequence of length `n`."""
        if n in self._exact or self._longest <= 4:
            return self._at(n)
        if self._poly is None:
            c1, c2, c3, top = self._at(1), self._at(2), self._at(3), self._at(self._longest)
            self._poly = []
            for u in range(self._n):
                # Newton's form through l = 1, 2, 3: exact in integers for integer quadratics
                d1, d2 = c2[u] - c1[u], c3[u] - 2 * c2[u] + c1[u]
                fits = (
                    c1[u]
                    + (self._longest - 1) * d1
                    + (self._longest - 1) * (self._longest - 2) // 2 * d2
                    == top[u]
                )
                self._poly.append((c1[u], d1, d2) if fits else None)
        out = []
        for u, p in enumerate(self._poly):
            if p is None:
                out.append(self._at(n)[u])
            else:
                out.append(p[0] + (n - 1) * p[1] + (n - 1) * (n - 2) // 2 * p[2])
        return out


def sample_unit_macs(model, trace, counter: str = "fvcore") -> torch.Tensor:
    """[B, U] MACs each sample executed in each unit: its runs of the unit times the unit's
    cost at the sample's length, or at the number of its tokens that ran the unit where a
    per-token decision routed only some of them (`trace.unit_tokens`)."""
    counts = trace.unit_counts.cpu()
    if trace.lengths is None or counts.shape[0] == 0:
        return counts * model.unit_macs(counter)[None]
    n = trace.lengths.cpu()
    k = n[:, None].repeat(1, counts.shape[1])  # the tokens each unit ran on, per sample
    for u, tokens in trace.unit_tokens.items():
        k[:, u] = (tokens.cpu() == 1).sum(1)
    table = torch.zeros(int(k.max()) + 1, counts.shape[1], dtype=torch.long)  # length 0: 0
    for m in set(k.unique().tolist()) - {0}:  # only the lengths met (each is a count)
        table[m] = model.unit_macs(counter, int(m))
    out = counts * table.gather(0, k)
    for u, runs in trace.unit_queries.items():  # each run's tokens at their own shares
        out[:, u] = sum(query_token_macs(model, u, r, n, counter).sum(1) for r in runs)
    return out


def query_token_macs(
    model, u: int, running: torch.Tensor, lengths: torch.Tensor, counter: str
) -> torch.Tensor:
    """[B, L] each token's MACs in unit `u` run with partial queries (runtime/token_rows.py):
    `running` [B, L] 1 where the token ran its query, 0 where it was a key and a value only
    (it pays `frozen_macs`), -1 for padding. A running token at position i pays C(i + 1) -
    C(i) under a causal mask (C: the unit's cost at a length), else an equal share of C(n)
    beyond the frozen cost; a sequence with every token running pays C(n) exactly."""
    running, lengths = running.cpu(), lengths.cpu()
    kappa = frozen_macs(model.units[u], counter)
    out = torch.zeros(running.shape, dtype=torch.long)
    for n in lengths.unique().tolist():
        rows = (lengths == n).nonzero().flatten()
        r = running.index_select(0, rows)[:, :n]
        share = _running_shares(model, u, n, counter)
        out[rows, :n] = torch.where(r == 1, share, torch.where(r == 0, kappa, 0))
    return out


def _running_shares(model, u: int, n: int, counter: str) -> torch.Tensor:
    """[n] what a running token at each position of a length-n sequence pays in unit `u`
    (cached on the unit: every layer's record of every batch reads it)."""
    unit, key = model.units[u], ("shares", counter, n)
    if key not in unit.token_costs:
        kappa = frozen_macs(unit, counter)
        c = [0] + [int(model.unit_macs(counter, m)[u]) for m in range(1, n + 1)]
        if causal_units(model)[u]:
            share = torch.tensor([c[i + 1] - c[i] for i in range(n)])
        else:  # (C(n) - n·kappa) / n each; a remainder (none for built-in blocks) to the last
            each, rest = divmod(c[n] - n * kappa, n)
            share = torch.full((n,), kappa + each)
            share[-1] += rest
        unit.token_costs[key] = share
    return unit.token_costs[key]


def frozen_macs(unit, counter: str) -> int:
    """The MACs a frozen token costs `unit` run with partial queries: its keys and values
    (counted on the unit's `rows` block with one token, none of them running)."""
    key = ("frozen", counter)
    if key not in unit.token_costs:
        from ..cost import rows_macs

        unit.token_costs[key] = rows_macs(unit.rows, counter)
    return unit.token_costs[key]


def causal_units(model) -> list[bool]:
    """Whether each unit holds causal attention."""
    from ..blocks.sequence import Attention

    return [
        any(isinstance(m, Attention) and m.causal for m in u.module.modules()) for u in model.units
    ]
