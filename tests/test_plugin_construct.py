"""A construct defined wholly in this file — nothing under dyngraph/ knows it — goes through
everything the built-in ones do: validation with line-numbered errors, compilation, the three
modes, training with its own objective, and `inspect`, the trace, `profile` and the docs.

The construct, `depth`: a controller reads the node's input once and picks how many times
(1..max_depth) the body runs on each sample; in infer mode each pass runs only on the rows
that still need it. Its objective: REINFORCE on the task loss for the choice, plus the expected
depth under the controller (differentiable) times `cost`, weighted by the stage's
`depth: {cost_weight: ...}`. It is not a copy of a built-in: halting decides after every step,
a metalayer picks among different modules, a gate runs its body once or not at all.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import dyngraph as dg
from dyngraph.constructs import Column, ConstructDef, Site, register_construct, unregister_construct
from dyngraph.core.types import ModuleRef, Strict


class DepthSpec(Strict):
    """`depth: {body: MODULE, controller: MODULE, max_depth: 3, cost: 0.01}`."""

    body: ModuleRef
    controller: ModuleRef
    max_depth: int = Field(3, ge=1, le=8, description="passes of the body at most")
    cost: float = Field(0.01, ge=0, description="weight of the expected depth in the loss")


class DepthOptions(Strict):
    """`depth:` in a training stage."""

    cost_weight: float = Field(1.0, ge=0, description="scales every depth node's cost")


class DepthRuntime:
    """One depth node in each execution mode."""

    def __init__(self, index: int, body, controller, max_depth: int, cost: float, reads, writes):
        self.index, self.body, self.controller = index, body, controller
        self.max_depth, self.cost = max_depth, cost
        self.reads, self.writes = reads, writes
        self.live_after: set[str] = set()

    @property
    def name(self) -> str:
        return f"depth {self.index}"

    def run(self, ctx) -> None:
        x = ctx.env[self.reads[0]]
        logits = ctx.call(self.controller, x)
        if ctx.mode == "train":
            d = torch.multinomial(torch.softmax(logits.detach(), 1), 1).squeeze(1)
            ctx.extras["depth"].append({"logits": logits, "depth": d})
        else:
            d = logits.argmax(1)
        ctx.record("depth", self.index, d + 1)
        h = ctx.call(self.body, x)  # the first pass: every row
        for t in range(1, self.max_depth):
            on = d >= t
            if not ctx.compacting:  # every row runs, the rows past their depth keep h
                h = torch.where(on[:, None], ctx.call(self.body, h, count=on), h)
                continue
            rows = torch.where(on)[0]
            if rows.numel() == 0:
                break
            y = ctx.call(self.body, h.index_select(0, rows), count=rows)
            h = ctx.put(h.clone(), rows, y)
        ctx.env[self.writes] = h


def build_depth(spec: DepthSpec, b, site: Site):
    index = b.next_index("depth", column="depth")
    name, path = f"depth {index}", site.path
    ctl = b.module(spec.controller, path + ("controller",), [site.in_shape])
    if ctl is None:
        return None
    scores = b.shapes_of(ctl, [site.in_shape], path + ("controller",), "the controller")
    if scores is not None and scores != (spec.max_depth,):
        b.problem(
            path + ("controller",),
            f"shape mismatch: the controller outputs {list(scores)}; a depth node needs "
            f"[{spec.max_depth}] (one score per depth)",
        )
        return None
    unit = b.unit(f"{name} controller", ctl, [site.in_shape], construct=name)
    body, out = b.program(spec.body, path + ("body",), site.in_shape, f"{name} body", name)
    if body is None or scores is None:
        return None
    if out != site.in_shape:
        b.problem(path + ("body",), f"shape mismatch: the body must keep the shape {site.in_shape}")
        return None
    rt = DepthRuntime(index, body, unit, spec.max_depth, spec.cost, [site.in_id], site.node_id)
    return rt, site.in_shape


def depth_objective(lc) -> dict[str, torch.Tensor]:
    picks = lc.out.extras.get("depth")
    if not picks:
        return {}
    reward = -lc.task_loss(lc.out.logits).detach()
    cost = reinforce = 0.0
    for node, pick in zip(lc.model.depths, picks, strict=True):
        probs = torch.softmax(pick["logits"], 1)
        depth = torch.arange(1, node.max_depth + 1, dtype=probs.dtype)
        cost = cost + node.cost * (probs * depth).sum(1).mean()
        logp = torch.log_softmax(pick["logits"], 1).gather(1, pick["depth"][:, None])[:, 0]
        reinforce = reinforce - ((reward - reward.mean()) * logp).mean()
    return {"depth_cost": lc.options.cost_weight * cost, "depth_reinforce": reinforce}


def _longest(node: DepthRuntime, counts: torch.Tensor, macs: torch.Tensor) -> None:
    counts[node.body.index] = node.max_depth


DEPTH = ConstructDef(
    key="depth",
    schema=DepthSpec,
    build=build_depth,
    plural="depths",
    column=Column("depth", per_node=True, empty=0, describe=lambda v, _: f"depth {v}"),
    objective=depth_objective,
    options=DepthOptions,
    paths=lambda node, done, going: (done, going * node.max_depth),
    longest=_longest,
    describe=lambda model, nodes, counter: (
        ["", "depth nodes:"] + [f"  {n.name}: its body up to {n.max_depth} times" for n in nodes]
    ),
    docs=lambda table: table(DepthSpec) + ["", "Stage options:", ""] + table(DepthOptions),
)

SPEC = """\
dyngraph: 1
name: depth_digits
input: {shape: [64]}
task: {type: classification, classes: 10}
graph:
  - {type: linear, out: 32}
  - depth:
      body: {type: residual_mlp, hidden: 64}
      controller: {type: linear, out: 3}
      max_depth: 3
      cost: 0.05
  - {type: classifier, classes: 10}
train:
  data: {name: digits}
  batch_size: 64
  stages:
    - {name: joint, steps: 60, optimizer: {type: adam, lr: 3.0e-3}, depth: {cost_weight: 2.0}}
"""


@pytest.fixture(scope="module", autouse=True)
def depth_construct():
    register_construct(DEPTH)
    try:
        yield DEPTH
    finally:
        unregister_construct("depth")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = dg.compile(SPEC, backend="none").eval()
    with torch.no_grad():  # a controller whose choice depends on the input
        ctl = model.depths[0].controller.module
        ctl.weight.normal_(0, 2.0)
        ctl.bias.zero_()
    return model


def _x(n: int = 48) -> torch.Tensor:
    return 3 * torch.randn(n, 64, generator=torch.Generator().manual_seed(4))


def test_it_validates_with_line_numbered_errors():
    bad = SPEC.replace("max_depth: 3", "max_depth: 0").replace("cost: 0.05", "cots: 0.05")
    with pytest.raises(dg.SpecError) as e:
        dg.load_spec(bad)
    text = str(e.value)
    assert "<string>:10:18: graph[1].depth.max_depth: " in text, text
    assert "<string>:11:7: graph[1].depth.cots: unknown key 'cots' (did you mean 'cost'?)" in text
    with pytest.raises(dg.SpecError) as e:  # the builder's own check, at the controller's line
        dg.load_spec(SPEC.replace("out: 3}", "out: 4}"))
    assert (
        "<string>:9:19: graph[1].depth.controller: shape mismatch: the controller outputs [4]"
        in str(e.value)
    )
    assert "depth" in dg.load_spec(SPEC).spec.graph[1].model_fields_set


def test_it_runs_in_the_three_modes_and_compacts_in_infer():
    model, x = _model(), _x()
    out = model(x)
    depth = out.trace.depth[:, 0]
    assert set(depth.tolist()) == {1, 2, 3}  # every depth taken by some row
    dense = model(x, mode="dense")
    assert torch.equal(dense.trace.depth, out.trace.depth)
    torch.testing.assert_close(out.logits, dense.logits, rtol=1e-5, atol=1e-5)
    # infer ran each pass on the rows that needed it: the body's rows are the sum of depths
    body = model.depths[0].body.index
    assert sum(n for u, n in out.trace.unit_calls() if u == body) == int(depth.sum())
    assert torch.equal(out.trace.unit_counts[:, body], depth)
    # each sample alone decides and outputs as in the batch
    for i in (0, 7, 31):
        one = model(x[i : i + 1])
        assert torch.equal(one.trace.depth, out.trace.depth[i : i + 1])
        torch.testing.assert_close(one.logits, out.logits[i : i + 1], rtol=1e-5, atol=1e-5)
    train = model.train()(x, mode="train")
    assert train.logits.shape == (48, 10) and len(train.extras["depth"]) == 1
    # the longest path: three passes of the body; per-input MACs follow the depth
    macs = model.per_input_macs(out.trace)
    body_macs = int(model.unit_macs()[body])
    torch.testing.assert_close(macs - macs.min(), (depth - depth.min()) * body_macs)
    assert model.static_macs() == int(macs.max()) + (3 - int(depth.max())) * body_macs


def test_it_trains_with_its_own_objective(tmp_path):
    torch.manual_seed(0)
    r = dg.train(SPEC, out=tmp_path / "run", progress=False)
    terms = {k for row in r.history for k in row}
    assert {"loss_depth_cost", "loss_depth_reinforce", "loss_task"} <= terms
    first, last = r.history[0], r.history[-1]
    assert last["loss_task"] < first["loss_task"]
    # the cost term is the stage's weight x the node's cost x the expected depth (1..3)
    assert 2.0 * 0.05 * 1 <= last["loss_depth_cost"] <= 2.0 * 0.05 * 3


def test_it_appears_in_inspect_the_trace_profile_and_the_docs():
    from dyngraph.docs import generate
    from dyngraph.inspect import count_paths, inspect_text

    model = _model()
    text = inspect_text(model)
    assert "depth 0 controller" in text and "depth 0: its body up to 3 times" in text
    assert count_paths(model) == 3
    out = model(_x())
    described = {model.describe_path(int(p)) for p in out.trace.path_id}
    assert described == {"depth [1]", "depth [2]", "depth [3]"}
    from dyngraph.data import load_data

    prof = dg.profile(model, load_data("digits", split="test"), max_paths=3, measure_each=2)
    assert {p.description for p in prof.paths} <= {"depth [1]", "depth [2]", "depth [3]"}
    docs = generate()
    assert "### `depth`" in docs and "| `cost_weight` |" in docs and "| `max_depth` |" in docs
    assert "(`exit`, `gate`, `metalayer`, `halting`, `depth`)" in docs
