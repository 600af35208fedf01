"""The three modes: compaction changes cost, never answers; nothing is wasted."""

from __future__ import annotations

import torch

from dyngraph.cost import flop_counter
from tests.conftest import compiled, random_batch


def test_decisions_vary(spec_path):
    """The other tests are only meaningful if samples take different paths."""
    model = compiled(spec_path, "none")
    out = model(random_batch(model))
    assert out.trace.path_id.unique().numel() >= 2


def test_batch_equals_each_sample_alone(spec_path):
    model = compiled(spec_path, "none")
    x = random_batch(model)
    batch = model(x)
    for i in range(x.shape[0]):
        one = model(x[i : i + 1])
        torch.testing.assert_close(one.logits, batch.logits[i : i + 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(one.trace.decisions()[0], batch.trace.decisions()[i])
        assert torch.equal(one.trace.unit_counts[0], batch.trace.unit_counts[i])


def test_an_empty_batch_gives_an_empty_answer(spec_path):
    model = compiled(spec_path, "none")
    one = model(random_batch(model, 1))
    x = random_batch(model, 1)[:0]
    for mode in ("infer", "dense"):
        out = model(x, mode=mode)
        assert out.logits.shape == (0, *one.logits.shape[1:])
        assert out.trace.decisions().shape == (0, one.trace.decisions().shape[1])
        assert out.trace.unit_counts.shape == (0, len(model.units))
        assert model.per_input_macs(out.trace).shape == (0,)


def test_dense_mode_records_what_infer_does(spec_path):
    model = compiled(spec_path, "none")
    x = random_batch(model)
    inf, den = model(x), model(x, mode="dense")
    torch.testing.assert_close(den.logits, inf.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(den.trace.decisions(), inf.trace.decisions())
    assert torch.equal(den.trace.unit_counts, inf.trace.unit_counts)
    assert torch.equal(den.trace.path_id, inf.trace.path_id)


def test_nothing_wasted(spec_path):
    """MACs executed by a batched infer run = the sum of each sample's units' static MACs."""
    model = compiled(spec_path, "none")
    x = random_batch(model)
    with torch.no_grad(), flop_counter() as fc:  # FlopCounterMode + the CPU SDPA handle
        out = model(x)
    executed = fc.get_total_flops()
    assert executed % 2 == 0
    ideal = int(model.per_input_macs(out.trace, counter="torch").sum())
    # (the only waste allowed: attention past each query's keys after a per-token exit,
    # which the trace reports)
    assert executed // 2 == ideal + out.trace.query_padding_macs
    assert executed // 2 <= 1.05 * ideal
    full = model(x, mode="dense").trace.unit_counts.shape[0] * model.static_macs("torch")
    assert ideal < full  # and it did skip work


def test_counters_agree_on_linear_units(spec_path):
    model = compiled(spec_path, "none")
    fv, th = model.unit_macs("fvcore"), model.unit_macs("torch")
    norms = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    for u, a, b in zip(model.units, fv.tolist(), th.tolist(), strict=True):
        if not any(isinstance(m, norms) for m in u.module.modules()):
            assert a == b, (u.name, a, b)


def test_train_mode_returns_what_objectives_need(spec_path):
    model = compiled(spec_path, "none")
    x = random_batch(model, 16)
    model.train()
    try:
        out = model(x)
        if model.exits:
            assert len(out.extras["exit_logits"]) == len(model.exits)
        if any(g.per == "sample" for g in model.gates):
            assert {"prob", "action", "logp"} <= set(out.extras["gates"][0])
        if any(getattr(g, "predictor", None) is not None for g in model.gates):
            # a Mixture-of-Depths predictor learns the top-k decisions of its gate
            assert {"prob", "target"} <= set(out.extras["token_predictors"][0])
        if model.metalayers:
            assert {"logits", "action", "logp", "gamma"} <= set(out.extras["choices"][0])
        if model.haltings:
            assert len(out.extras["halting"][0]["states"]) >= 1
        loss = sum(v.float().pow(2).mean() for v in _tensors(out))
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _tensors(out):
    yield out.logits
    yield from out.extras.get("exit_logits", [])
    for g in out.extras.get("gates", []):
        yield g["prob"]
    for c in out.extras.get("choices", []):
        yield c["logp"]
    for h in out.extras.get("halting", []):
        yield h["probs"][0]


def test_a_trace_read_later_is_the_trace_of_its_own_pass(spec_path):
    """Traces are built from the pass's log when first read: reading one after other passes
    (of other batches, in other modes) gives what reading it at once gave."""
    model = compiled(spec_path, "none")
    x = random_batch(model)
    kept = model(x)
    fresh = model(x)
    decisions, counts = fresh.trace.decisions(), fresh.trace.unit_counts
    model(random_batch(model, seed=7))
    model(x[:1])
    model(x, mode="dense")
    assert torch.equal(kept.trace.decisions(), decisions)
    assert torch.equal(kept.trace.unit_counts, counts)
    assert len(kept.trace) == x.shape[0]
