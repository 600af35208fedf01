"""Parameter names say where a block stands in the spec; old checkpoints still load."""

from __future__ import annotations

import pytest
import torch

import dyngraph as dg
from dyngraph.training.checkpoint import CheckpointError, load_into, model_state, refuse_old_order
from dyngraph.training.optim import trainable_parameters
from tests.conftest import ROOT

NESTED = """
dyngraph: 1
name: nested
input: {shape: [6]}
task: {type: classification, classes: 3}
graph:
  - {id: stem, type: linear, out: 8}
  - repeat: 2
    nodes:
      - repeat: 2
        nodes:
          - {type: residual_mlp, hidden: 4}
      - gate: {body: {type: residual_mlp, hidden: 4}, policy: {type: ff_gate}}
  - {type: classifier, classes: 3}
"""


def _names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_blocks_are_named_by_id_graph_position_and_repetition():
    model = dg.compile(NESTED, backend="none")
    names = _names(model)
    assert names[:2] == ["blocks.stem.weight", "blocks.stem.bias"]
    for outer in (0, 1):
        for inner in (0, 1):
            assert f"blocks.graph.1.rep{outer}.0.rep{inner}.0.fc1.weight" in names
        assert f"blocks.graph.1.rep{outer}.1.gate.body.fc1.weight" in names
    assert "blocks.graph.2.fc.weight" in names
    # nested repeats are distinct nodes (they once got the same id and failed as a cycle)
    x = torch.randn(5, 6)
    assert model(x).logits.shape == (5, 3)
    # a prefix of a name selects everything below it, as a stage's `trainable:`
    chosen = trainable_parameters(model, ["graph.1.rep1"])
    below = [p for n, p in model.named_parameters() if n.startswith("blocks.graph.1.rep1.")]
    assert {id(p) for p in chosen} == {id(p) for p in below} and len(below) == 14


def test_unshared_steps_named_modules_and_reserved_words():
    names = _names(dg.compile(ROOT / "specs" / "l2s_lista.yaml", backend="none"))
    # 16 unshared LISTA layers at one spec entry: step, step_1 .. step_15
    assert names[:3] == [
        "blocks.graph.0.halting.step.W",
        "blocks.graph.0.halting.step.theta",
        "blocks.graph.0.halting.step_1.W",
    ]
    assert "blocks.graph.0.halting.step_15.W" in names
    design = _names(dg.compile(ROOT / "specs" / "design_constructs.yaml", backend="none"))
    assert any(n.startswith("blocks.large.") for n in design)  # modules: {large: ...}
    # an id that nn.Module uses for itself (`train`) gets a "_" instead of breaking the build
    spec = NESTED.replace("id: stem", "id: train")
    assert _names(dg.compile(spec, backend="none"))[0] == "blocks.train_.weight"


@pytest.mark.parametrize("spec", ["skipnet_rnn", "composer_wide_digits", "l2s_lista"])
def test_a_checkpoint_with_the_old_names_loads_the_same_weights(tmp_path, spec):
    torch.manual_seed(0)
    model = dg.compile(ROOT / "specs" / f"{spec}.yaml", backend="none").eval()
    # the checkpoint as dyngraph wrote it before: blocks under their old flat names
    new_to_old = {v: k for k, v in model._plan.legacy_names.items()}
    old_weights = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            block = next(n for n in new_to_old if k.startswith(f"blocks.{n}."))
            k = f"blocks.{new_to_old[block]}.{k[len(f'blocks.{block}.') :]}"
        old_weights[k] = v
    assert any("__" in k for k in old_weights) and old_weights.keys() != model.state_dict().keys()
    state = model_state(model) | {"model": old_weights}
    torch.save(state, tmp_path / "old.pt")

    torch.manual_seed(1)
    fresh = dg.compile(ROOT / "specs" / f"{spec}.yaml", backend="none").eval()
    load_into(fresh, tmp_path / "old.pt")
    x = torch.randn(16, *model.spec.input.shape)
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    # resuming its optimizer state needs the parameters in the order they had
    if spec == "composer_wide_digits":  # its named modules now stand apart from the graph
        with pytest.raises(CheckpointError, match="another order"):
            refuse_old_order(state, fresh, "old.pt")
    else:
        refuse_old_order(state, fresh, "old.pt")
    # a checkpoint of another model is still refused, by its names
    torch.save({"blocks.nope.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_into(fresh, tmp_path / "other.pt")
