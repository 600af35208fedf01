"""The CALM reproduction's cost model of per-token exit policies (dyngraph/repro/calm.py): what
a policy costs as the trace counts it, and the stop-by-position policy it reports."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.repro.calm import SPEC, policy_fraction, stop_policy
from dyngraph.repro.common import spec_dict
from dyngraph.repro.mod import static_model


@pytest.mark.parametrize("k", range(4))
def test_a_policy_costs_what_the_trace_counts(k):
    """Every token leaving at exit k: the policy's MAC fraction is the compiled model's
    per-input MACs over the static 4-layer model's."""
    torch.manual_seed(0)
    model = dg.compile(spec_dict(SPEC), backend="none").eval()
    static = dg.compile(static_model(4), backend="none").eval()
    model.set_threshold([1.01] * k + [0.0] * (3 - k))
    x = torch.randint(1, 7, (5, 16))
    with torch.no_grad():
        trace = model(x).trace
    assert (trace.tokens["exit"] == k).all()
    measured = model.per_input_macs(trace).double() / static.static_macs()
    assert measured.tolist() == pytest.approx([policy_fraction([k] * 16)] * 5, rel=1e-9)


def test_the_stop_policy_raises_only_positions_a_deeper_exit_helps():
    acc = torch.full((4, 16), 0.2)
    assert stop_policy(acc) == [0] * 16  # no deeper exit helps anyone: all leave first
    acc[1:, 3] = 1.0  # exit 1 solves position 3
    acc[2:, 5] = 1.0  # exit 2 solves position 5
    policy = stop_policy(acc)
    assert policy[3] == 1 and policy[5] == 2
    assert all(e == 0 for i, e in enumerate(policy) if i not in (3, 5))
    assert policy_fraction(policy) <= 0.5


def test_the_stop_policy_stays_within_its_budget():
    acc = torch.linspace(0.2, 1.0, 4).unsqueeze(1).expand(4, 16)  # deeper is better everywhere
    for budget in (0.26, 0.4, 0.6):
        policy = stop_policy(acc, budget)
        assert policy_fraction(policy) <= budget
    assert stop_policy(acc, 0.26) == [0] * 16  # (every token at exit 0 costs 25.3%)
