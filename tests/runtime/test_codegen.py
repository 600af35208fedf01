"""Infer mode's generated function (runtime/codegen.py) against the plan interpreter."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.runtime import kernels

from ..conftest import ROOT, compiled, forced_decisions, random_batch


def _both(model, x):
    """(generated, interpreted) outputs of one infer pass."""
    with torch.no_grad():
        gen = model(x)
        model.codegen = False
        try:
            interp = model(x)
        finally:
            model.codegen = True
    return gen, interp


def _assert_same(gen, interp) -> None:
    t, u = gen.trace, interp.trace
    for field in ("exit", "gates", "choices", "steps", "path_id", "unit_counts"):
        assert torch.equal(getattr(t, field), getattr(u, field)), field
    assert torch.equal(gen.logits, interp.logits)


@pytest.mark.parametrize("aten", [False, True], ids=["kernels", "aten"])
@pytest.mark.parametrize("forced", [False, True], ids=["criteria", "forced"])
def test_every_spec_runs_alike_generated_and_interpreted(spec_path, forced, aten):
    """Same decisions, executed units, paths and bit-equal outputs: a batch whose rows leave,
    skip and route apart, and single samples."""
    model = compiled(spec_path, "none")
    x = random_batch(model, 48, seed=7)
    with forced_decisions(model, forced), kernels.disabled() if aten else torch.no_grad():
        for batch in (x, x[:1], x[5:6]):
            _assert_same(*_both(model, batch))


def test_settings_changed_after_compiling_reach_the_generated_function():
    """Thresholds are read at run time, not baked into the source."""
    model = compiled(ROOT / "specs" / "msdnet_early_exit.yaml", "none")
    x = random_batch(model, 64, seed=8)
    saved = [e.threshold for e in model.exits]
    try:
        exits = []
        for thr in (0.0, 0.5, 1.0):
            model.set_threshold(thr)
            gen, interp = _both(model, x)
            _assert_same(gen, interp)
            exits.append(gen.trace.exit.float().mean().item())
        assert exits[0] == 0.0 and exits[2] == len(model.exits) - 1, exits
    finally:
        model.set_threshold(saved[:-1])


def test_segments_and_exits_are_written_out_and_other_constructs_run_as_steps():
    """An early-exit model's function calls its units directly (no environment dict); a step
    without its own code runs through `step.run` on the values it reads."""
    ee = compiled(ROOT / "specs" / "msdnet_early_exit.yaml", "none")
    src = ee.source()
    assert "ctx.env" not in src and src.count(".split(ctx") == len(ee.exits) - 1
    assert all(f"u{u.index}(" in src for u in ee.units)
    l2s = compiled(ROOT / "specs" / "l2s_lista.yaml", "none")
    assert "halting_0.run(ctx)" in l2s.source()


def test_dense_and_train_modes_still_run_the_interpreter():
    model = compiled(ROOT / "specs" / "skipnet_ff.yaml", "none")
    x = random_batch(model, 16, seed=9)
    calls = []
    real = model._infer
    model._infer = lambda ctx: calls.append(ctx.mode) or real(ctx)
    try:
        with torch.no_grad():
            model(x, mode="dense")
            model(x)
    finally:
        model._infer = real
    assert calls == ["infer"]


def test_a_model_compiled_again_gets_its_own_function():
    a = dg.compile(ROOT / "specs" / "digits_early_exit.yaml", backend="none")
    b = dg.compile(ROOT / "specs" / "digits_early_exit.yaml", backend="none")
    assert a._infer is not b._infer and a.source() == b.source()
