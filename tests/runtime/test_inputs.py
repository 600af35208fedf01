"""The runtime's input contract: what `model(x)` accepts, converts and refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import dyngraph as dg
from tests.conftest import SPECS, compiled, random_batch, spec_id

DIGITS = next(p for p in SPECS if p.stem == "digits_early_exit")


@pytest.fixture(scope="module")
def model():
    return compiled(DIGITS, "none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_floating_inputs_are_cast_to_the_models_dtype(model, dtype):
    x = random_batch(model, 16)
    ref = model(x)
    out = model(x.to(dtype))
    assert out.logits.dtype == torch.float32
    if dtype == torch.float64:  # exact: float32 -> float64 -> float32 is the identity
        assert torch.equal(out.logits, ref.logits)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_boolean_inputs_are_refused(model, dtype):
    with pytest.raises(TypeError, match=f"expected a floating-point input, got {dtype}"):
        model(torch.ones(4, 64, dtype=dtype))


def test_numpy_arrays_and_lists_are_converted(model):
    x = random_batch(model, 8)
    ref = model(x).logits
    assert torch.equal(model(x.numpy()).logits, ref)
    assert torch.equal(model(x.numpy().astype(np.float64)).logits, ref)
    assert torch.equal(model(x.tolist()).logits, ref)
    with pytest.raises(TypeError, match="expected a tensor"):
        model("not a tensor")
    with pytest.raises(TypeError, match="cannot read the input list"):
        model([[1.0, "a"]])


def test_a_device_mismatch_names_both(model):
    with pytest.raises(ValueError, match="the input is on meta and the model on cpu"):
        model(torch.empty(4, 64, device="meta"))


def test_a_wrong_shape_names_the_expected_one(model):
    with pytest.raises(ValueError, match=r"expected input \[B, 64\], got \[4, 63\]"):
        model(torch.zeros(4, 63))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_refused_by_number_unless_asked(model, bad):
    x = random_batch(model, 6)
    x[2, 5] = x[4, 0] = bad
    with pytest.raises(ValueError, match=r"2 input row\(s\) hold NaN or inf \(rows 2, 4\)"):
        model(x)
    model.nonfinite = "propagate"
    try:
        out = model(x)
        assert out.logits.shape == (6, 10)
        assert torch.isfinite(out.logits[[0, 1, 3, 5]]).all()
    finally:
        model.nonfinite = "raise"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_settings_refuse_nan_and_out_of_range(spec):
    model = compiled(spec, "none")
    before = model.decision_settings()
    if model.exits[:-1]:
        for bad in (
            float("nan"),
            float("inf"),
            -0.5 if model.exits[0].kind == "max_prob" else None,
        ):
            if bad is not None:
                with pytest.raises(ValueError, match="out of range"):
                    model.set_threshold(bad)
    if model.gates:
        for bad in (float("nan"), 1.5, -0.1, True):
            with pytest.raises(ValueError, match="out of range"):
                model.set_threshold(bad, construct="gate")
    if model.metalayers:
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match="gamma"):
                model.set_gamma(bad)
    with pytest.raises(ValueError, match="unknown construct"):
        model.set_threshold(0.5, construct="metalayer")
    assert model.decision_settings() == before  # a refused value changed nothing


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_a_whole_model_pickles(spec):
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    x = random_batch(model, 12)
    a, b = model(x), copy(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.trace.path_id, b.trace.path_id)
