"""Training: every spec's objective, resume after kill -9, DDP, NaN, calibration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dyngraph as dg
from dyngraph.training import TrainingError, train
from dyngraph.training.batches import Batches
from dyngraph.training.calibrate import calibrate_budget
from dyngraph.training.evaluate import evaluate
from dyngraph.training.loss import compute_loss
from tests.conftest import ROOT, SPECS, compiled

TINY = ROOT / "tests" / "fixtures" / "tiny_train.yaml"
TRAINABLE = [
    p for p in SPECS if dg.load_spec(p).spec.train is not None and dg.load_spec(p).spec.train.stages
]

EXPECTED_TERMS = {
    "calm_tagger": {"task", "distill_kl"},
    "calm_learned": {"task", "distill_kl", "stop"},
    "ut_tagger": {"task", "ponder_0"},
    "msdnet_early_exit": {"task"},
    "scan_early_exit": {"task", "distill_kl"},
    "skipnet_ff": {"task", "gate_penalty"},
    "skipnet_rnn": {"task", "gate_penalty"},
    "blockdrop": {"task"},
    "act_parity": {"task", "ponder_0"},
    "pondernet_parity": {"ponder_reconstruction", "ponder_kl"},
    "l2s_lista": {"l2s_oracle"},
    "composer_wide_digits": {"task"},
    "deebert_transformer": {"task"},
    "pabee_transformer": {"task"},
    "layerdrop_transformer": {"task", "gate_penalty"},
    "composer_transformer": {"task"},
    "composer_tokens": {"task", "route_reinforce", "route_cost"},
    "pondernet_addition": {"ponder_reconstruction", "ponder_kl"},
    "state_tagger": {"task", "gate_penalty"},
    "mod_tagger": {"task", "router_predictor"},
    "act_addition": {"task", "ponder_0"},
    "addition_lm": {"task", "gate_penalty"},
    "skipnet_resnet": {"task", "gate_penalty"},
    "blockdrop_resnet": {"task"},
    "msdnet_multiscale": {"task"},
}


@pytest.mark.parametrize("path", TRAINABLE, ids=lambda p: p.stem)
def test_first_stage_objective_has_its_terms_and_gradients(path):
    torch.manual_seed(0)
    loaded = dg.load_spec(path)
    model = dg.compile(loaded, backend="none").train()
    stage = loaded.spec.train.stages[0]
    for g in model.gates:
        g.mode_override = stage.gate.decisions
    x, y = Batches(loaded.spec.train).batch(0)
    out = model(x[:32], mode="train")
    loss, terms = compute_loss(model, out, x[:32], y[:32], stage, ramp=1.0)
    assert EXPECTED_TERMS[path.stem] <= set(terms), terms
    assert torch.isfinite(loss)
    loss.backward()
    decision = [u for u in model.units if u.kind == "decision" and not u.head]
    for u in decision:  # every decision unit learns from this stage's objective, where trained
        if any(n in stage.trainable for n in ("all", "controllers")) and stage.name != "backbone":
            assert any(
                p.grad is not None and p.grad.abs().sum() > 0 for p in u.module.parameters()
            ), u.name


def test_batches_are_a_function_of_the_step_and_ranks_split_them():
    tr = dg.load_spec(TINY).spec.train
    a, b = Batches(tr).batch(7), Batches(tr).batch(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    r0, r1 = Batches(tr, 0, 2).batch(7), Batches(tr, 1, 2).batch(7)
    assert torch.equal(torch.cat([r0[0], r1[0]]), a[0])
    assert not torch.equal(Batches(tr).batch(8)[0], a[0])


@pytest.mark.parametrize(
    "spec", [TINY, ROOT / "specs" / "composer_wide_digits.yaml"], ids=["fresh", "fixed"]
)
def test_training_seeds_see_other_batches_and_the_same_evaluation_splits(spec):
    """Seeds of a reproduction differ in their batches, not in the test set they are scored on."""
    tr = dg.load_spec(spec).spec.train
    other = tr.model_copy(update={"seed": 1})
    assert not torch.equal(Batches(tr).batch(3)[0], Batches(other).batch(3)[0])
    assert torch.equal(Batches(tr).split("test").x, Batches(other).split("test").x)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final.pt", weights_only=True)["model"]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "dyngraph", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def test_kill_9_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    full = tmp_path / "full"
    assert _cli("train", str(TINY), "--out", str(full), "--no-progress").wait(timeout=300) == 0
    cut = tmp_path / "cut"
    proc = _cli("train", str(TINY), "--out", str(cut), "--no-progress")
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the second stage, after a few checkpoints
        ck = cut / "checkpoint.pt"
        if ck.exists():
            try:
                st = torch.load(ck, weights_only=True)
            except Exception:  # pragma: no cover - being replaced right now
                continue
            if st["global_step"] >= 100:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert state["global_step"] < 300, "the run finished before it was killed"
    assert not (cut / "final.pt").exists()
    assert (
        _cli("train", str(TINY), "--out", str(cut), "--resume", "--no-progress").wait(timeout=300)
        == 0
    )
    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_match_one(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["name"] = "tiny_ddp"
    spec["train"]["stages"] = spec["train"]["stages"][:1]  # deterministic: no sampled decisions
    path = tmp_path / "tiny_ddp.yaml"
    path.write_text(yaml.safe_dump(spec))
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert _cli("train", str(path), "--out", str(one), "--no-progress").wait(timeout=300) == 0
    p = _cli("train", str(path), "--out", str(two), "--nproc", "2", "--no-progress")
    log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log
    a, b = _final(one), _final(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["train"]["checkpoint_every"] = 1
    spec["train"]["stages"] = [
        {"name": "explode", "steps": 200, "optimizer": {"type": "sgd", "lr": 1.0e12}}
    ]
    with pytest.raises(TrainingError, match="loss is (nan|inf).*last good checkpoint is"):
        train(spec, out=tmp_path, log=lambda *a: None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_calibrated_budget_holds_on_the_test_split(tmp_path):
    r = train(TINY, out=tmp_path, log=lambda *a: None)
    model = r.model
    tr = model.spec.train
    val, test = Batches(tr).split("val"), Batches(tr).split("test")
    res = calibrate_budget(model, val, 0.8)
    assert res["met"]
    frac = evaluate(model, test)["macs_fraction"]
    assert abs(frac - 0.8) <= 0.05 * 0.8, frac  # within ±5% of the budget


def test_scan_feature_alignment_term():
    spec = """
dyngraph: 1
name: align
input: {shape: [6]}
task: {type: classification, classes: 3}
graph:
  - {type: linear, out: 8}
  - {type: residual_mlp, hidden: 8}
  - exit: {head: {type: classifier, classes: 3}, criterion: {type: max_prob, threshold: 0.9},
           distill: {temperature: 2.0, kl_weight: 0.5, feature_weight: 1.0}}
  - {type: residual_mlp, hidden: 8}
  - exit: {head: {type: classifier, classes: 3}}
"""
    from dyngraph.spec import schema

    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").train()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss, terms = compute_loss(model, model(x), x, y, schema.StageSpec(steps=1))
    assert {"task", "distill_kl", "distill_features"} <= set(terms) and torch.isfinite(loss)
    # the alignment is scale-free: scaling the residual stream does not change it
    feats = model(x).extras["exit_features"]
    norm = torch.nn.functional.layer_norm
    a = (norm(feats[0], (8,)) - norm(feats[1], (8,))).pow(2).mean()
    b = (norm(10 * feats[0], (8,)) - norm(10 * feats[1], (8,))).pow(2).mean()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


#: architecture fingerprints of every spec's model as of 05b3349 (before #14's refactor)
FINGERPRINTS = {
    "calm_tagger": "44b730015d9b",
    "ut_tagger": "98e15a263994",
    "act_parity": "2484eafff984",
    "blockdrop": "4b9420ace9fd",
    "composer_wide_digits": "7f2076b34582",
    "design_constructs": "662536731b3b",
    "digits_early_exit": "2594160c1501",
    "l2s_lista": "16422c34b912",
    "msdnet_early_exit": "cac0aab1f0d2",
    "pondernet_parity": "b64ab7200ad3",
    "scan_early_exit": "cac0aab1f0d2",
    "skipnet_ff": "1019e6077ce8",
    "skipnet_rnn": "28f36912cf24",
    # issue 15's specs, as they were first written
    "addition_lm": "cf3e71b53bdf",
    "blockdrop_resnet": "bc31abe432de",
    "composer_transformer": "263c9d172e29",
    "composer_tokens": "da8587aea4d1",
    "pondernet_addition": "c66002bd5cdf",
    "deebert_transformer": "c9ff2809e8b6",
    "layerdrop_transformer": "aa57b23094f7",
    "msdnet_multiscale": "da085fc5937d",
    "pabee_transformer": "0d12f3f3c329",
    "skipnet_resnet": "71727a9ba1e3",
    "state_tagger": "9e0fc0ac1702",
    "mod_tagger": "2c285e888fcc",
    "act_addition": "370218cf997f",
    # issue 16's learned per-token stop, as first written
    "calm_learned": "83a8ee8aa740",
}


def test_checkpoints_written_before_keep_loading(spec_path):
    """A checkpoint records its model's architecture fingerprint (the units and the generated
    infer code): a change of code that changes it refuses every checkpoint users hold, so it
    is a decision (with a mapping for the old ones), never a side effect of a refactor."""
    from dyngraph.training.checkpoint import fingerprint

    assert fingerprint(compiled(spec_path, "none")) == FINGERPRINTS[spec_path.stem]
