"""Every spec compiles with each backend; compiled and eager agree; segments have no graph break."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compiled, random_batch


def _out_shape(model):
    t = model.spec.task
    if t.per == "token":
        return (model.spec.input.shape[0], t.classes)
    return (t.classes,) if t.type == "classification" else tuple(model._plan.out_shape)


@pytest.mark.parametrize("backend", ["none", "inductor"])
def test_infer_gives_logits_and_trace(spec_path, backend):
    model = compiled(spec_path, backend)
    x = random_batch(model)
    out = model(x)
    assert out.logits.shape == (64, *_out_shape(model))
    tr = out.trace
    assert len(tr) == 64 and tr.path_id.shape == (64,)
    assert tr.unit_counts.shape == (64, len(model.units))
    assert (tr.unit_counts.sum(1) > 0).all()


def test_compiled_matches_eager(spec_path):
    eager, comp = compiled(spec_path, "none"), compiled(spec_path, "inductor")
    comp.load_state_dict(eager.state_dict())
    x = random_batch(eager)
    a, b = eager(x), comp(x)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(a.trace.decisions(), b.trace.decisions())


def test_segments_have_no_graph_break(spec_path):
    model = compiled(spec_path, "none")
    for u in model.units:
        ex = torch._dynamo.explain(u.module)(*u.example_inputs(3))
        assert ex.graph_break_count == 0, (u.name, ex.break_reasons)
        assert ex.graph_count == 1, u.name


def test_thresholds_and_gamma_change_without_recompiling():
    from torch._dynamo.utils import counters

    from tests.conftest import SPECS

    by_name = {p.stem: p for p in SPECS}
    ee = compiled(by_name["msdnet_early_exit"], "inductor")
    co = compiled(by_name["composer_wide_digits"], "inductor")
    xe, xc = random_batch(ee), random_batch(co)
    ee(xe), co(xc)  # warm: every unit compiled at this batch's subset sizes
    before = counters["stats"]["unique_graphs"]
    old = [e.threshold for e in ee.exits[:-1]]
    ee.set_threshold([t * 0.9 for t in old])
    ee(xe)
    ee.set_threshold(old)
    co.set_gamma(2.0)
    co(xc)
    co.set_gamma(0.3)
    assert counters["stats"]["unique_graphs"] == before


def test_no_recompile_per_subset_size_or_mode():
    """Units compile once with a dynamic batch dimension (plus the size-1 specialization): new
    batches, with other subset sizes at every decision point, and dense mode reuse them."""
    from torch._dynamo.utils import counters

    from tests.conftest import SPECS

    by_name = {p.stem: p for p in SPECS}
    for name in ("msdnet_early_exit", "composer_wide_digits", "skipnet_ff"):
        model = compiled(by_name[name], "inductor")
        x = random_batch(model)
        model(x), model(x[:1])  # warm: the dynamic graphs and the size-1 specializations
        before = counters["stats"]["unique_graphs"]
        for seed in (2, 3):
            model(random_batch(model, n=48, seed=seed))
        model(x, mode="dense")
        assert counters["stats"]["unique_graphs"] == before, name
