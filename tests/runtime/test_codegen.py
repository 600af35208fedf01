"""Infer mode's generated function (runtime/codegen.py) against the plan interpreter."""

from __future__ import annotations

import copy

import pytest
import torch

import dyngraph as dg
from dyngraph.runtime import kernels
from dyngraph.runtime.codegen import generate
from dyngraph.runtime.steps import SegmentStep

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


def test_every_construct_writes_its_own_code(spec_path):
    """No step of a built-in construct falls back to the environment dict; every unit is
    called directly or by its construct."""
    model = compiled(spec_path, "none")
    src = model.source()
    assert "ctx.env" not in src
    for step in model._plan.steps:
        assert not isinstance(step, SegmentStep) or f"u{step.unit.index}(" in src


class _Opaque:
    """A construct runtime without `emit_infer` (as a new construct may be): it runs as a
    step on `ctx.env`."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.reads, self.writes, self.live_after = inner.reads, inner.writes, inner.live_after

    def run(self, ctx) -> None:
        self.inner.run(ctx)


@pytest.mark.parametrize("forced", [False, True], ids=["criteria", "forced"])
def test_a_step_without_its_own_code_runs_on_the_environment(spec_path, forced):
    model = compiled(spec_path, "none")
    plan = model._plan
    opaque = copy.copy(plan)
    opaque.steps = [s if isinstance(s, SegmentStep) else _Opaque(s) for s in plan.steps]
    fn, src = generate(opaque)
    assert src.count(".run(ctx)") == sum(isinstance(s, _Opaque) for s in opaque.steps)
    x = random_batch(model, 48, seed=10)
    saved = model._infer
    with forced_decisions(model, forced):
        want = [_both(model, b)[0] for b in (x, x[:1])]
        model._infer = fn
        try:
            for b, w in zip((x, x[:1]), want, strict=True):
                with torch.no_grad():
                    _assert_same(model(b), w)
        finally:
            model._infer = saved


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


def test_a_deep_copy_runs_its_own_weights():
    """The generated function is bound to its model's units: a copy (an EMA or teacher model)
    gets its own, and changing the copy leaves the original as it was."""
    model = compiled(ROOT / "specs" / "msdnet_early_exit.yaml", "none")
    twin = copy.deepcopy(model)
    assert twin._infer is not model._infer and twin.source() == model.source()
    x = random_batch(model, 32, seed=11)
    with torch.no_grad():
        before = model(x).logits
        for p in twin.parameters():
            p.mul_(-1.0)
        gen, interp = _both(twin, x)
        _assert_same(gen, interp)
        assert not torch.equal(gen.logits, before)
        assert torch.equal(model(x).logits, before)


def test_a_model_compiled_again_gets_its_own_function():
    a = dg.compile(ROOT / "specs" / "digits_early_exit.yaml", backend="none")
    b = dg.compile(ROOT / "specs" / "digits_early_exit.yaml", backend="none")
    assert a._infer is not b._infer and a.source() == b.source()
