"""Per-token MACs: each token's share of every unit it ran, summing exactly to its sequence's
MACs; causal attention makes later tokens cost more; the profile reports them."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.profiler.tokens import causal_units, depth_per_token, token_macs

from ..conftest import ROOT, SPECS, compiled, random_batch, spec_id

SEQUENCE_SPECS = [p for p in SPECS if dg.load_spec(p).spec.input.is_sequence]


@pytest.mark.parametrize("path", SEQUENCE_SPECS, ids=spec_id)
def test_token_macs_sum_to_each_sequence_macs(path):
    model = compiled(path, "none")
    x = random_batch(model, 16)
    trace = model(x).trace
    macs = token_macs(model, trace, width=x.shape[1])
    assert torch.equal(macs.sum(1), model.per_input_macs(trace))
    pad = torch.arange(x.shape[1])[None] >= trace.lengths[:, None]
    assert (macs[pad] == 0).all() and (macs[~pad] > 0).all()


def test_causal_attention_costs_more_at_later_positions():
    model = compiled(ROOT / "specs" / "state_tagger.yaml", "none")  # causal layers
    assert any(causal_units(model))
    x = random_batch(model, 64)
    x = x[(x != 0).all(1)]
    trace = model(x).trace
    macs = token_macs(model, trace)
    same = (trace.decisions() == trace.decisions()[:1]).all(1)  # one path: one cost pattern
    row = macs[same][0]
    assert (row.diff() > 0).all()  # each later query reads one more key


def test_profile_reports_tokens_of_a_mod_model(tmp_path):
    model = compiled(ROOT / "specs" / "mod_tagger.yaml", "none")
    x = random_batch(model, 40)
    prof = dg.profile(model, x, latency=False, curve=False)
    t = prof.summary["per_token"]
    assert len(t["mean_macs_by_position"]) == x.shape[1]
    depth = prof.per_token_depth
    assert set(t["depth_histogram"]) <= set(range(len(model.gates) + 1))
    assert sum(t["depth_histogram"].values()) == int((depth >= 0).sum())
    assert torch.equal(prof.per_token_macs.sum(1), prof.per_input_macs)
    assert prof.summary["dispatch_waste"] == 1.0
    out = prof.save(tmp_path)
    assert (out / "tokens.png").exists() and "## Tokens" in (out / "report.md").read_text()
    trace = model(x).trace
    assert torch.equal(
        depth_per_token(trace),
        sum((t == 1).long() for t in trace.tokens.values()) - (x == 0).long(),
    )
