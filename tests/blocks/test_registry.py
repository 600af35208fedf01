"""Every registered block builds, runs, and is counted the same by fvcore and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from dyngraph.blocks import BLOCKS, build_block
from dyngraph.compiler.units import IdsShape, example
from dyngraph.cost import fvcore_macs, torch_macs

# One example per block: params and per-sample input shapes. A new block needs an entry here,
# or test_every_block_has_an_example fails.
EXAMPLES: dict[str, tuple[dict, list[tuple]]] = {
    "linear": ({"out": 8}, [(16,)]),
    "conv2d": ({"out": 4, "kernel": 3}, [(3, 8, 8)]),
    "batchnorm": ({}, [(3, 8, 8)]),
    "layernorm": ({}, [(16,)]),
    "relu": ({}, [(16,)]),
    "gelu": ({}, [(16,)]),
    "tanh": ({}, [(16,)]),
    "sigmoid": ({}, [(16,)]),
    "silu": ({}, [(16,)]),
    "identity": ({}, [(16,)]),
    "flatten": ({}, [(3, 4, 4)]),
    "maxpool2d": ({"kernel": 2}, [(3, 8, 8)]),
    "avgpool2d": ({"kernel": 2}, [(3, 8, 8)]),
    "global_avgpool": ({}, [(3, 8, 8)]),
    "mlp": ({"hidden": 32, "out": 8, "layers": 3}, [(16,)]),
    "residual_mlp": ({"hidden": 32, "norm": True}, [(16,)]),
    "resnet_block": ({"out": 8, "stride": 2}, [(4, 8, 8)]),
    "classifier": ({"classes": 5}, [(16,)]),
    "glimpse": ({"slices": [[0, 8], [0, 8]]}, [(8, 16)]),
    "add": ({}, [(16,), (16,)]),
    "concat": ({}, [(16,), (8,)]),
    "custom": ({"target": "torch.nn.Tanh"}, [(16,)]),
    "gru_step": ({"dim": 12}, [(12,), (16,)]),
    "rnn_step": ({"dim": 12}, [(12,), (16,)]),
    "lista_layer": ({"m": 16, "n": 32}, [(32,), (16,)]),
    "ff_gate": ({"hidden": 8}, [(16,)]),
    "rnn_gate": ({"hidden": 8}, [(16,), (8,)]),
    "blockdrop_policy": ({"hidden": 8}, [(16,)]),
    "composer_rnn": ({"hidden": 8, "preferences": {"g": {"cost": "params"}}}, [(16,), (8,), (1,)]),
    "act_unit": ({}, [(16,)]),
    "lambda_unit": ({}, [(16,)]),
    "stop_mlp": ({"hidden": 8}, [(16,)]),
    "token_router": ({"hidden": 8}, [(6, 16)]),
    "embedding": ({"vocab": 10, "dim": 8}, [IdsShape((6,))]),
    "attention": ({"heads": 2}, [(6, 8)]),
    "transformer_block": ({"heads": 2, "mlp_ratio": 2}, [(6, 8)]),
    "pool": ({"how": "last"}, [(6, 8)]),
    "token_classifier": ({"classes": 5}, [(6, 8)]),
}


def test_every_block_has_an_example():
    assert set(BLOCKS) == set(EXAMPLES)


def _instance(name: str):
    params, shapes = EXAMPLES[name]
    bd = BLOCKS[name]
    build_shapes = (
        shapes[-1:]
        if bd.role == "step"
        else shapes[:1]
        if bd.role in ("gate_policy", "router")
        else shapes
    )
    m = build_block(name, params, build_shapes)
    if name == "blockdrop_policy":
        m.add_site(shapes[0])
        m.add_site(shapes[0])
        m.finalize()
    if name == "composer_rnn":
        m = m.add_site(shapes[0], 3)
    return m.eval(), shapes


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_builds_and_runs(name):
    m, shapes = _instance(name)
    xs = tuple(example(s, 3) for s in shapes)
    out = m(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.shape[0] == 3 and torch.isfinite(o).all() for o in outs)
    if BLOCKS[name].role == "step":
        assert out.shape[1:] == tuple(m.state_shape)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_counters_agree(name):
    """fvcore and FlopCounterMode/2 agree on every block whose MACs are matmuls and convs."""
    m, shapes = _instance(name)
    xs = tuple(example(s, 1) for s in shapes)
    fv, unsupported = fvcore_macs(m, xs)
    th = torch_macs(m, xs)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.AvgPool2d)
    if any(isinstance(mod, norms) for mod in m.modules()) or name == "global_avgpool":
        assert fv >= th  # fvcore also counts normalization and pooling; FlopCounterMode does not
    else:
        assert fv == th, (fv, th, unsupported)


def test_unknown_block_has_a_suggestion():
    with pytest.raises(KeyError, match="did you mean 'residual_mlp'"):
        build_block("residual_mpl", {}, [(4,)])
