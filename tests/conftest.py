"""Shared fixtures: every spec in specs/, compiled once per backend per session."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

import dyngraph as dg
from dyngraph.forcing import force, forced

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "fixtures" / "bad").glob("*.yaml"))

torch.set_num_threads(1)


def spec_id(p: Path) -> str:
    return p.stem


_CACHE: dict[tuple[str, str], dg.DynamicModel] = {}


def compiled(path: Path, backend: str) -> dg.DynamicModel:
    """A model compiled once per session per backend, with the same seed-0 weights."""
    key = (str(path), backend)
    if key not in _CACHE:
        torch.manual_seed(0)
        model = dg.compile(path, backend=backend).eval()
        diversify(model)
        if backend != "none":  # the eager model's thresholds: diversify reads them off the
            # model's own outputs, where another backend's float noise can pick another gap
            model.load_decision_settings(compiled(path, "none").decision_settings())
        _CACHE[key] = model
    return _CACHE[key]


def random_batch(model: dg.DynamicModel, n: int = 64, seed: int = 1) -> torch.Tensor:
    """Random inputs; for token ids, random ids of random lengths padded at the end."""
    g = torch.Generator().manual_seed(seed)
    inp = model.spec.input
    if inp.dtype == "int64":
        length = inp.shape[0]
        ids = torch.randint(1, inp.vocab, (n, length), generator=g)
        ids[ids == inp.pad_id] = 1 if inp.pad_id != 1 else 2
        if inp.pad_id is not None:
            lengths = torch.randint(1, length + 1, (n,), generator=g)
            ids[torch.arange(length)[None, :] >= lengths[:, None]] = inp.pad_id
        return ids
    return 2 * torch.randn(n, *inp.shape, generator=g)


@torch.no_grad()
def diversify(model: dg.DynamicModel) -> None:
    """Make an untrained model's decisions depend on its input, so that tests see many paths.

    Decision units get larger random weights and zero biases (probabilities spread around 0.5);
    exit thresholds are set to the 70th percentile of each exit's confidence (a learned stop's
    probability) on a random batch.
    """
    g = torch.Generator().manual_seed(123)
    for u in model.units:
        if u.kind != "decision" or u.construct.startswith("exit"):
            continue
        for mod in u.module.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(
                    torch.randn(mod.weight.shape, generator=g) * 2 / math.sqrt(mod.in_features)
                )
                if mod.bias is not None:
                    mod.bias.zero_()
    l2s = [h for h in model.haltings if h.rule == "l2s"]
    if l2s:  # stop where about a third of the (sample, step) stop probabilities pass
        model.train()
        out = model(random_batch(model, 256, seed=98), mode="train")
        model.eval()
        for h, ex in zip(model.haltings, out.extras["halting"], strict=True):
            if h.rule == "l2s":
                h.threshold = float(torch.quantile(torch.stack(ex["probs"]).flatten(), 0.9))
    if model.exits:
        from dyngraph.constructs.exit import confidence

        out = model(random_batch(model, 256, seed=99), mode="dense")
        stops = dict(out.extras.get("exit_stop", []))  # (criterion `learned`: stop logits)
        for k, (e, logits) in enumerate(
            zip(model.exits[:-1], out.extras["exit_logits"], strict=False)
        ):
            if e.kind == "patience":
                continue
            z = logits.flatten(0, -2)  # (per-token exits: every token's logits)
            if e.kind == "learned":  # leave where the stop probability >= threshold
                c = torch.sigmoid(stops[k].flatten()).unique()
            else:
                c = confidence(z, e.kind, e.temperature).unique()  # sorted
            # halfway between two scores: an input seen here (short sequences repeat) must
            # not sit exactly on the threshold, where float noise of another batch flips it
            i = int((0.3 if e.kind == "entropy" else 0.7) * (len(c) - 1))
            if e.per == "token" and len(c) > 100:  # thousands of scores, close together:
                # the widest gap near that rank, so that compiled units' float noise (1e-6)
                # flips no token of another batch
                lo, hi = i - len(c) // 20, i + len(c) // 20
                i = lo + int((c[lo + 1 : hi + 1] - c[lo:hi]).argmax())
            e.threshold = float((c[i] + c[min(i + 1, len(c) - 1)]) / 2)


@contextlib.contextmanager
def forced_decisions(model: dg.DynamicModel, on: bool = True):
    """Force every exit, gate and metalayer (`force`: partial batches at every decision) for
    a while; `on=False`: leave the criteria as they are."""
    if not on:
        yield model
        return
    with forced(model, exit=0.4, gate=0.6):
        for m in model.metalayers:  # each its own number of choices
            force(model, "metalayer", [1.0 / len(m.choices)] * len(m.choices), nodes=[m])
        try:
            yield model
        finally:
            force(model, "metalayer", None)


@pytest.fixture(params=SPECS, ids=spec_id)
def spec_path(request) -> Path:
    return request.param
