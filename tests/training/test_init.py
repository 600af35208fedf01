"""Exits trained onto a static network trained without them (`init:` and `trainable:`)."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.data import load_data
from dyngraph.training import train

TASK = {
    "dyngraph": 1,
    "input": {"shape": [3], "dtype": "int64", "vocab": 7, "pad_id": 0},
    "task": {"type": "classification", "classes": 5},
}
LAYER = {"type": "transformer_block", "heads": 2, "mlp_ratio": 2}
HEAD = {"type": "classifier", "classes": 5, "norm": True}


def _train(graph, name, out, trainable="all", steps=300):
    spec = TASK | {
        "name": name,
        "graph": graph,
        "train": {
            "data": {"name": "state_sequence", "params": {"steps": 3}},
            "batch_size": 64,
            "stages": [
                {
                    "name": "s",
                    "steps": steps,
                    "trainable": [trainable],
                    "optimizer": {"type": "adamw", "lr": 3.0e-3},
                }
            ],  # fmt: skip
        },
    }
    return train(spec, out=out, log=lambda *a: None).model.eval()


def test_exits_attach_to_a_static_network(tmp_path):
    torch.manual_seed(0)
    emb = {"type": "embedding", "vocab": 7, "dim": 32}
    static = _train([emb, dict(LAYER), dict(LAYER), HEAD], "static", tmp_path / "static")
    ckpt = str(tmp_path / "static" / "final.pt")

    def init(prefix):
        return {"init": {"checkpoint": ckpt, "prefix": prefix}}

    exits = [
        emb | init("blocks.{name}"),  # the same place in both: graph.0
        LAYER | init("blocks.{name}"),  # graph.1
        {"exit": {"head": HEAD, "criterion": {"type": "max_prob", "threshold": 0.9}}},
        LAYER | init("blocks.graph.2"),  # graph.3 here, graph.2 in the static network
        {"exit": {"head": HEAD | init("blocks.graph.3")}},  # the static head as the last exit
    ]
    before = dg.compile(TASK | {"name": "exits", "graph": exits}).eval()
    test = load_data("state_sequence", split="test", n=1000, steps=3)
    with torch.no_grad():
        want = static(test.x).logits
        before.set_threshold(1.01)  # everyone to the last exit: the static network itself
        torch.testing.assert_close(before(test.x).logits, want)
    model = _train(exits, "exits", tmp_path / "exits", trainable="heads", steps=150)
    backbone = {k: v for k, v in before.state_dict().items() if ".exit." not in k}
    for k, v in backbone.items():
        assert torch.equal(model.state_dict()[k], v), k  # frozen
    with torch.no_grad():
        out = model(test.x, mode="dense").extras["exit_logits"]
    first = float((out[0].argmax(1) == test.y).float().mean())
    static_acc = float((want.argmax(1) == test.y).float().mean())
    assert static_acc > 0.6
    assert first > 0.4  # the new head learned to read the frozen first layer


def test_init_problems_are_reported_at_the_block(tmp_path):
    torch.save({"blocks.x.weight": torch.zeros(2)}, tmp_path / "w.pt")
    emb = {"type": "embedding", "vocab": 7, "dim": 8}
    head = {"type": "classifier", "classes": 5}
    cases = [
        (emb | {"init": {"checkpoint": str(tmp_path / "w.pt"), "prefix": "blocks.nothing"}},
         head, "graph[0].init: checkpoint", "no tensors under 'blocks.nothing.'"),
        (emb, head | {"init": {"checkpoint": str(tmp_path / "missing.pt")}},
         "graph[1].init: checkpoint", "no such file"),
        (emb, head | {"init": {"checkpoint": str(tmp_path / "w.pt"), "prefix": "blocks.x"}},
         "graph[1].init: checkpoint", "does not fit"),
    ]  # fmt: skip
    for first, second, where, what in cases:
        with pytest.raises(dg.SpecError) as e:
            dg.compile(TASK | {"name": "bad_init", "graph": [first, second]})
        assert where in str(e.value) and what in str(e.value), str(e.value)
