"""The runtime writes in place only into values nobody reads again: never the caller's input,
never a value a later node reads, never memory shared with one (an identity passes its input on).
"""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.forcing import force

HEADER = "dyngraph: 1\nname: t\ninput: {shape: [8]}\ntask: {type: classification, classes: 3}\n"
GATE = "{gate: {body: {type: residual_mlp, hidden: 8}, policy: {type: ff_gate}}}"

SPECS = {
    # the first gate reads the caller's tensor itself
    "gate_on_input": f"graph:\n  - {GATE}\n  - {GATE}\n  - {{type: classifier, classes: 3}}\n",
    # the gate's input is read again by a skip connection after it
    "input_read_later": f"""graph:
  - {{id: a, type: linear, out: 8}}
  - {{id: g, {GATE[1:-1]}}}
  - {{type: add, inputs: [a, g]}}
  - {{type: classifier, classes: 3}}
""",
    # an identity hands the gate a value that is the same memory as one read later
    "aliased_by_identity": f"""graph:
  - {{id: a, type: linear, out: 8}}
  - {{id: b, type: identity}}
  - {{id: g, {GATE[1:-1]}}}
  - {{type: add, inputs: [a, g]}}
  - {{type: classifier, classes: 3}}
""",
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_partial_gates_change_nothing_a_user_or_a_later_node_reads(name):
    torch.manual_seed(0)
    model = dg.compile(HEADER + SPECS[name], backend="none").eval()
    force(model, "gate", 0.5)  # some rows run the body, some skip it
    x = torch.randn(64, 8)
    before = x.clone()
    out = model(x)
    assert torch.equal(x, before), "the caller's input was written to"
    assert 0 < int((out.trace.gates == 1).sum()) < out.trace.gates.numel()
    dense = model(x, mode="dense")
    torch.testing.assert_close(out.logits, dense.logits)
    assert torch.equal(out.trace.gates, dense.trace.gates)


@pytest.mark.parametrize("codegen", [True, False], ids=["generated", "interpreted"])
def test_a_dead_gate_input_is_reused_in_place(codegen):
    """Two gates in a row: the first one's output is read only by the second, which writes its
    body's rows into it (no copy of the whole batch)."""
    torch.manual_seed(0)
    model = dg.compile(HEADER + SPECS["gate_on_input"], backend="none").eval()
    model.codegen = codegen
    force(model, "gate", 0.5)
    seen = {}
    second = model.gates[1]
    real = second.infer

    def spy(ctx, x, src, live):
        seen["in"], seen["free"] = x.data_ptr(), live is not None and ctx.free(x, live)
        y = real(ctx, x, src, live)
        seen["out"] = y.data_ptr()
        return y

    second.infer = spy
    model(torch.randn(64, 8))
    assert seen["free"] and seen["in"] == seen["out"]
