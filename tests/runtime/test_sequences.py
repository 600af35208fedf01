"""Sequence inputs: a batch of mixed lengths behaves as each sequence alone, padding executes
nothing and costs nothing, attention is counted per query row, bad ids are refused."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.cost import attention_macs, flop_counter, unit_macs
from dyngraph.data import load_data

from ..conftest import SPECS, compiled, random_batch, spec_id

SEQUENCE_SPECS = [p for p in SPECS if dg.load_spec(p).spec.input.is_sequence]
VECTOR_SPECS = [p for p in SPECS if p not in SEQUENCE_SPECS]


def test_the_sequence_specs_are_found():
    assert len(SEQUENCE_SPECS) >= 6


def _valid(logits: torch.Tensor, length: int) -> torch.Tensor:
    return logits[:, :length] if logits.dim() == 3 else logits


@pytest.mark.parametrize("path", SEQUENCE_SPECS, ids=spec_id)
def test_mixed_lengths_equal_each_sequence_alone(path):
    model = compiled(path, "none")
    x = random_batch(model, 24)
    lengths = (x != model.spec.input.pad_id).sum(1)
    assert lengths.unique().numel() > 3  # the batch does mix lengths
    out = model(x)
    for i in range(x.shape[0]):
        n = int(lengths[i])
        alone = model(x[i : i + 1])
        assert torch.equal(alone.trace.decisions(), out.trace.decisions()[i : i + 1])
        torch.testing.assert_close(
            _valid(alone.logits, n), _valid(out.logits[i : i + 1], n), atol=1e-5, rtol=0
        )
    if out.logits.dim() == 3:  # per-token outputs: padded positions hold zeros
        pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
        assert (out.logits[pad] == 0).all()


@pytest.mark.parametrize("path", SEQUENCE_SPECS, ids=spec_id)
def test_no_dispatch_waste_and_padding_costs_nothing(path):
    model = compiled(path, "none")
    x = random_batch(model, 32)
    with torch.no_grad(), model.eager(), flop_counter() as fc:
        out = model(x)
    ideal = model.per_input_macs(out.trace, "torch")
    # waste 1.00 beyond attention past each query's keys, which the trace reports
    assert fc.get_total_flops() // 2 == int(ideal.sum()) + out.trace.query_padding_macs
    # a sequence padded to the longest length costs what it costs at its own length
    short = int(out.trace.lengths.argmin())
    n = int(out.trace.lengths[short])
    assert n < x.shape[1]
    with torch.no_grad(), model.eager(), flop_counter() as fc:
        alone = model(x[short : short + 1])
    padding = alone.trace.query_padding_macs
    assert fc.get_total_flops() // 2 == int(model.per_input_macs(alone.trace, "torch")[0]) + padding
    full = x[short : short + 1].clone()
    full[full == model.spec.input.pad_id] = 1 if model.spec.input.pad_id != 1 else 2
    with torch.no_grad(), model.eager(), flop_counter() as fc:
        model(full)
    assert fc.get_total_flops() // 2 > int(model.per_input_macs(alone.trace, "torch")[0])


@pytest.mark.parametrize("path", SEQUENCE_SPECS[:2], ids=spec_id)
def test_per_length_costs_equal_a_count_at_that_length(path):
    model = compiled(path, "none")
    for n in range(1, model.spec.input.shape[0] + 1):
        inputs = model.unit_inputs(n)
        direct = [unit_macs_at(u, inputs[u.index]) for u in model.units]
        assert model.unit_macs("fvcore", n).tolist() == direct


def unit_macs_at(unit, inputs) -> int:
    from dyngraph.cost import count_unit

    return count_unit(unit, "fvcore", inputs).macs


def _reference_attention(q, k, v, causal: bool) -> torch.Tensor:
    """Attention in matmuls, one query row at a time over the keys it reads."""
    rows = []
    for i in range(q.shape[2]):
        keys = slice(0, i + 1) if causal else slice(None)
        s = q[:, :, i : i + 1] @ k[:, :, keys].transpose(-1, -2) / q.shape[-1] ** 0.5
        rows.append(s.softmax(-1) @ v[:, :, keys])
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_handle_matches_a_reference_in_matmuls(causal):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    with flop_counter() as fc:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with flop_counter() as ref_fc:
        ref = _reference_attention(q, k, v, causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert fc.get_total_flops() == ref_fc.get_total_flops() > 0
    assert attention_macs(q.shape, k.shape, v.shape, causal) * 2 == fc.get_total_flops()


def test_attention_handle_is_fvcore_s_and_flop_counter_s():
    block = dg.blocks.build_block("attention", {"heads": 2, "causal": True}, [(9, 16)])
    x = torch.randn(1, 9, 16)
    assert unit_macs(_Unit(block), "fvcore") == unit_macs(_Unit(block), "torch")
    # projections 9 x (16 x 48 + 16 x 16), attention 2 heads x 45 pairs x (8 + 8)
    assert unit_macs(_Unit(block), "torch") == 9 * (16 * 48 + 16 * 16) + 2 * 45 * 16
    assert block(x).shape == x.shape


class _Unit:
    def __init__(self, module):
        self.module = module

    def example_inputs(self, batch, device):
        return (torch.randn(batch, 9, 16),)


def test_bad_ids_are_one_line_errors():
    model = compiled(SEQUENCE_SPECS[0], "none")
    length, vocab = model.spec.input.shape[0], model.spec.input.vocab
    ok = torch.ones(2, length, dtype=torch.long)
    cases = [
        (ok.float(), TypeError, "token ids"),
        (ok + vocab, ValueError, "outside"),
        (torch.tensor([[1, 0] + [1] * (length - 2)] * 2), ValueError, "pad at the end"),
        (torch.zeros(2, length, dtype=torch.long), ValueError, "all padding"),
        (torch.ones(2, length + 1, dtype=torch.long), ValueError, "expected ids"),
    ]
    for x, err, text in cases:
        with pytest.raises(err, match=text) as e:
            model(x)
        assert "\n" not in str(e.value)
    vector = compiled(VECTOR_SPECS[0], "none")
    with pytest.raises(ValueError, match="lengths are for sequence inputs"):
        vector(torch.randn(2, *vector.spec.input.shape), lengths=[1, 1])


def test_float_sequences_take_their_lengths():
    spec = {
        "dyngraph": 1,
        "name": "float_seq",
        "input": {"shape": [5, 4], "sequence": True},
        "task": {"type": "classification", "classes": 3},
        "graph": [
            {"type": "linear", "out": 8},
            {"type": "transformer_block", "heads": 2},
            {"type": "classifier", "classes": 3},
        ],
    }
    model = dg.compile(spec).eval()
    x = torch.randn(4, 5, 4)
    out = model(x, lengths=[5, 2, 3, 2])
    torch.testing.assert_close(out.logits[1:2], model(x[1:2], lengths=[2]).logits)
    # what lies past a sequence's length is never read
    y = x.clone()
    y[1, 2:] = 1e3
    torch.testing.assert_close(model(y, lengths=[5, 2, 3, 2]).logits, out.logits)
    assert out.trace.lengths.tolist() == [5, 2, 3, 2]
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        model(x, lengths=[5, 0, 3, 2])


def test_generated_sequence_sets_label_every_real_position():
    d = load_data("state_tokens", n=256)
    real = d.x != 0
    assert ((d.y != -100) == real).all()
    assert (real.sum(1) == d.meta["k"]).all()
    s = load_data("state_sequence", n=256)
    final = d.y.gather(1, (d.meta["k"] - 1)[:, None]).squeeze(1)
    assert torch.equal(s.y, final)  # the same walks, labelled at the end
    full = load_data("state_sequence", n=256, noop=True)  # no-op steps instead of padding
    assert torch.equal(full.y, s.y) and (full.x != 0).all()
    assert torch.equal(full.x[s.x != 0], s.x[s.x != 0]) and (full.x[s.x == 0] == 7).all()
    walks = load_data("state_tokens", n=64, steps=16, full=True)  # every walk takes 16 steps
    assert (walks.x != 0).all() and (walks.y != -100).all() and (walks.meta["k"] == 16).all()
    a = load_data("addition", n=64, target="next")
    assert torch.equal(a.y[:, :-1][a.x[:, 1:] != 0], a.x[:, 1:][a.x[:, 1:] != 0])


def test_a_file_of_ids_with_lengths_trains_and_profiles(tmp_path):
    import numpy as np

    g = np.random.default_rng(0)
    x = g.integers(1, 7, size=(300, 6))
    lengths = g.integers(1, 7, size=300)
    y = (x * (np.arange(6)[None, :] < lengths[:, None])).sum(1) % 5
    np.savez(tmp_path / "ids.npz", x=x, y=y, lengths=lengths)
    spec = {
        "dyngraph": 1,
        "name": "ids_file",
        "input": {"shape": [6], "dtype": "int64", "vocab": 7, "pad_id": 0},
        "task": {"type": "classification", "classes": 5},
        "graph": [
            {"type": "embedding", "vocab": 7, "dim": 16},
            {"type": "transformer_block", "heads": 2},
            {"type": "classifier", "classes": 5},
        ],
        "train": {
            "data": {"name": str(tmp_path / "ids.npz")},
            "batch_size": 32,
            "stages": [{"name": "s", "steps": 3}],
        },
    }
    from dyngraph.data import load_file
    from dyngraph.data.splits import load_split
    from dyngraph.training import train

    d = load_file(tmp_path / "ids.npz", ids=True, pad=0)  # what lies past a length is padding
    assert d.x.dtype == torch.long
    assert torch.equal((d.x != 0).sum(1), torch.from_numpy(lengths))
    loaded = dg.load_spec(spec)
    model = train(spec, out=tmp_path / "run", log=lambda *a: None).model
    prof = dg.profile(model, load_split(loaded.spec.train.data, "test"), latency=False, curve=False)
    assert prof.summary["dispatch_waste"] == 1.0


def test_pointer_chase_labels_follow_k_pointers():
    d = load_data("pointer_chase", n=64, size=8, hops=6)
    for ids, y, k in zip(d.x.tolist(), d.y.tolist(), d.meta["k"].tolist(), strict=True):
        assert ids[0] == 8 + k
        at = 0
        for _ in range(k):
            at = ids[1 + at] - 1
        assert y == at
