"""A learned per-token stop (`criterion: {type: learned}` on a `per: token` exit; CALM's
early-exit classifier): a stop unit reads each running token's state and the token leaves when
sigmoid(unit(x)) >= threshold. It decides as its definition says, a batch equals its
sequences alone, its MACs count for every token it reads, it trains on its own (the model's
states detached) towards "going deeper would not make this token right", and it exports."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import dyngraph as dg
from dyngraph.constructs.exit import stop_loss
from dyngraph.core.errors import SpecError
from dyngraph.cost import flop_counter
from dyngraph.repro.calm import learned_spec
from dyngraph.tasks import IGNORE
from dyngraph.training.loss import LossContext, compute_loss

from ..conftest import random_batch
from .test_token_exits import assert_matches


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # (its own copy of specs/calm_learned.yaml: the weights change below)
    m = dg.compile(learned_spec(), backend="none").eval()
    with torch.no_grad():  # stop logits of either sign: tokens leave at every exit
        for e in m.exits[:-1]:
            e.stop.module.fc.weight.mul_(8.0)
    return m


def _reference(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence by hand: after each exit, the running tokens whose stop probability reaches
    the threshold keep that exit's logits and their state; later layers update the others.
    Returns (logits [L, C], the exit of each token [L])."""
    s = model.units[0](ids)[0]
    n = s.shape[1]
    running = torch.ones(n, dtype=torch.bool)
    out, where = torch.zeros(n, 5), torch.full((n,), -1)
    for u in model.units[1:]:
        e = next((e for e in model.exits if u is e.head), None)
        if e is not None:
            z = u(s)[0]
            leave = running.clone()
            if not e.last:
                leave &= torch.sigmoid(e.stop(s)[0, :, 0]) >= e.threshold
            out[leave], where[leave] = z[leave], e.index
            running &= ~leave
        elif not any(u is e.stop for e in model.exits):
            s = torch.where(running[None, :, None], u(s)[0], s)
    return out, where


def test_infer_equals_the_reference_definition(model):
    x = random_batch(model, 24, seed=3)
    out = model(x)
    exits = out.trace.tokens["exit"][x != 0]
    assert len(exits.unique()) >= 3 and (exits < 3).any(), exits.unique()
    assert_matches(_reference, model, x, out)


@pytest.mark.parametrize("mode", ["infer", "dense"])
def test_a_batch_equals_its_sequences_alone(model, mode):
    x = random_batch(model, 9, seed=4)
    out = model(x, mode=mode)
    for i in range(x.shape[0]):
        one = model(x[i : i + 1], mode=mode)
        assert one.trace.tokens["exit"].tolist() == out.trace.tokens["exit"][i : i + 1].tolist()
        torch.testing.assert_close(one.logits, out.logits[i : i + 1], atol=1e-5, rtol=1e-4)
        assert model.per_input_macs(one.trace).tolist() == [int(model.per_input_macs(out.trace)[i])]


def test_the_stop_units_macs_count_for_every_token_they_read(model):
    x = random_batch(model, 32, seed=7)
    with torch.no_grad(), flop_counter() as fc:
        out = model(x)
    ideal = int(model.per_input_macs(out.trace, "torch").sum())
    assert fc.get_total_flops() // 2 == ideal + out.trace.query_padding_macs
    assert (
        model.per_input_macs(out.trace).tolist()
        == model.per_input_macs(model(x, mode="dense").trace).tolist()
    )
    # stop unit k reads the tokens that reach exit k
    exits = out.trace.tokens["exit"]
    for e in model.exits[:-1]:
        read = exits[x != 0] >= e.index
        assert int(read.sum()) > 0
        ran = out.trace.tokens[f"{e.name} stop tokens"][x != 0] == 1  # (-1: never reached)
        assert ran.tolist() == read.tolist(), e.name


def test_it_trains_alone_towards_going_deeper_would_not_help(model):
    x = random_batch(model, 16, seed=8)
    y = torch.randint(0, 5, x.shape).masked_fill(x == 0, IGNORE)
    stage = dg.load_spec(learned_spec()).spec.train.stages[0]
    model.train()
    try:
        out = model(x)
        assert [k for k, _ in out.extras["exit_stop"]] == [0, 1, 2]
        loss, terms = compute_loss(model, out, x, y, stage)
        assert {"task", "distill_kl", "stop"} <= set(terms)
        lc = LossContext(model, out, x, y, None)
        stop_loss(lc, out.extras["exit_logits"], out.extras["exit_stop"]).backward()
        for e in model.exits[:-1]:
            assert e.stop.module.fc.weight.grad.abs().sum() > 0
        trunk = [p for u in model.units if u.kind == "segment" or u.head
                 for p in u.module.parameters()]  # fmt: skip
        assert all(p.grad is None or not p.grad.any() for p in trunk)  # states detached
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_the_stop_target_is_right_here_or_wrong_at_the_last_exit():
    # 4 tokens: right here / wrong here, right at last; wrong both; right both
    y = torch.tensor([[0, 0, 0, 0, IGNORE]])
    here = torch.tensor([[[5.0, 0], [0, 5.0], [0, 5.0], [5.0, 0], [0, 5.0]]])
    last = torch.tensor([[[5.0, 0], [5.0, 0], [0, 5.0], [5.0, 0], [0, 5.0]]])
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])  # (the unlabelled token does not count)

    class Out:
        extras = {}

    lc = LossContext(None, Out(), None, y, None)
    for s in (torch.zeros(1, 5), torch.tensor([[3.0, -3.0, 3.0, 3.0, -9.0]])):
        want = torch.nn.functional.binary_cross_entropy_with_logits(s[0, :4], target)
        torch.testing.assert_close(stop_loss(lc, [here, last], [(0, s)]), want)


def test_thresholds_move_tokens_between_exits(model):
    x = random_batch(model, 32, seed=9)
    saved = [e.threshold for e in model.exits[:-1]]
    try:
        model.set_threshold(0.0)
        assert (model(x).trace.tokens["exit"][x != 0] == 0).all()
        model.set_threshold(1.01)
        assert (model(x).trace.tokens["exit"][x != 0] == 3).all()
    finally:
        model.set_threshold(saved)


def test_the_export_runs_the_stop_units(model, tmp_path):
    dg.export(model, tmp_path / "exp")
    sys.path.insert(0, str(tmp_path / "exp"))
    try:
        import dyngraph_runner

        runner = dyngraph_runner.load(tmp_path / "exp")
        for n, seed in ((1, 1), (7, 2), (64, 3)):
            x = random_batch(model, n, seed=seed)
            want, got = model(x), runner(x)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
            assert got.macs.tolist() == model.per_input_macs(want.trace).tolist()
    finally:
        sys.path.remove(str(tmp_path / "exp"))
        for k in [k for k in sys.modules if k.startswith("dyngraph_runner")]:
            del sys.modules[k]


def _spec(**change) -> dict:
    d = learned_spec()
    for k, v in change.items():
        node = d["graph"][1]["nodes"][1]["exit"]
        if k == "per":
            node.pop("per")
            d["task"].pop("per")
            node["head"] = {"type": "classifier", "classes": 5, "pool": "first"}
            d["graph"][-1]["exit"]["head"] = copy.deepcopy(node["head"])
            d["graph"][-1]["exit"].pop("per")
        else:
            node["criterion"][k] = v
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"per": "sample"}, "criterion 'learned' (a stop unit on each token's state) decides per token"),
        ({"unit": {"type": "token_classifier", "classes": 2}}, "it must give [L, 1]"),
        ({"unit": {"type": "transformer_block", "heads": 2}}, "it must give [L, 1]"),
        ({"threshold": 1.5}, "threshold"),
    ],
    ids=["per-sample", "two-logits", "wide", "threshold"],
)  # fmt: skip
def test_bad_stops_get_one_line_errors(change, message):
    with pytest.raises(SpecError) as e:
        dg.compile(_spec(**change), backend="none")
    assert message in str(e.value), str(e.value)
