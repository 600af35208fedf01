"""Export (#17): a compiled model as a folder that runs with torch alone, giving the compiled
model's outputs, traces and per-input MACs; a damaged export is a one-line error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import dyngraph as dg
from dyngraph.export import ExportError, export, load_exported
from dyngraph.runtime import kernels
from dyngraph.runtime.runner import fused

from .conftest import SPECS, compiled, diversify, random_batch, spec_id

BY_NAME = {p.stem: p for p in SPECS}
#: specs whose plans have a batch-1 one-graph form, of each kind (exits, gates, a sequence)
ONE_GRAPH = ("digits_early_exit", "scan_early_exit", "deebert_transformer", "skipnet_ff",
             "state_tagger")  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per spec, made on first use."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(path):
        if path.stem not in made:  # (the one-graph program only where a test reads it)
            single = path.stem in ONE_GRAPH + ("pabee_transformer",)
            made[path.stem] = export(compiled(path, "none"), root / path.stem, single=single)
        return made[path.stem]

    return get


def _same(model, runner, x) -> None:
    """The export's outputs, trace columns, unit counts and per-input MACs are the model's."""
    want, got = model(x), runner(x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    for name, col in want.trace.columns.items():
        assert torch.equal(got.columns[name], col.cpu()), name
    assert torch.equal(got.unit_counts, want.trace.unit_counts.cpu())
    assert torch.equal(got.macs, model.per_input_macs(want.trace))


@pytest.mark.parametrize("path", SPECS, ids=spec_id)
def test_an_export_runs_as_the_compiled_model(path, exports):
    model = compiled(path, "none")
    runner = load_exported(exports(path))
    for b in (1, 7, 256):
        _same(model, runner, random_batch(model, b, seed=b))


def test_tokens_leave_and_halt_at_their_own_depth_in_an_export(exports, tmp_path):
    """Per-token exits (CALM) and halting per position (Universal Transformer): the layers
    after a token stops run the running tokens' queries only (the rows programs), and each
    token's cost is its own, over sequences of mixed lengths."""
    calm = compiled(BY_NAME["calm_tagger"], "none")
    x = random_batch(calm, 256, seed=5)
    assert len(set(calm(x).trace.tokens["exit"].flatten().tolist()) - {-1}) == len(calm.exits)
    _same(calm, load_exported(exports(BY_NAME["calm_tagger"])), x)
    torch.manual_seed(0)
    ut = dg.compile(BY_NAME["ut_tagger"], backend="none").eval()
    with torch.no_grad():  # halting probabilities spread around 0.5: 2..6 steps
        fc = ut.haltings[0].unit.module.halt.fc
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(3))
                        * 4 / fc.in_features**0.5)  # fmt: skip
        fc.bias.zero_()
    runner = load_exported(export(ut, tmp_path / "ut", single=False))
    assert set(runner.rows) == {ut.haltings[0].unit.index}
    for b in (1, 7, 256):
        x = random_batch(ut, b, seed=b)
        _same(ut, runner, x)
    assert len(set(ut(x).trace.tokens["halting 0"].flatten().tolist()) - {-1}) >= 3


def test_decoding_by_the_causal_predictor_exports_and_is_settable(exports):
    """Mixture-of-Depths routes by its causal predictor while decoding (`set_decode`)."""
    model = compiled(BY_NAME["mod_tagger"], "none")
    runner = load_exported(exports(BY_NAME["mod_tagger"]))
    x = random_batch(model, 64, seed=4)
    try:
        model.set_decode(True)
        runner.set_decode(True)
        counts = model(x).trace.columns["gates"]
        assert len(set(counts.flatten().tolist())) > 2  # sequences routed their own numbers
        _same(model, runner, x)
    finally:
        model.set_decode(False)
    runner.set_decode(False)
    _same(model, runner, x)
    with pytest.raises(ValueError, match="no per-token gate"):
        load_exported(exports(BY_NAME["skipnet_ff"])).set_decode(True)


def test_a_node_without_an_export_step_is_named_in_one_line(tmp_path, monkeypatch):
    """A construct that cannot export (a plugin's without `export_step`, here one made so)."""
    from dyngraph.constructs.token_gate import TokenGateRuntime

    monkeypatch.setattr(TokenGateRuntime, "export_step", lambda self: None)
    with pytest.raises(ExportError) as e:
        export(compiled(BY_NAME["mod_tagger"], "none"), tmp_path / "x", single=False)
    assert "gate 0 (TokenGateRuntime) cannot be exported yet" in str(e.value)
    assert "\n" not in str(e.value)


def test_thresholds_are_settable_on_an_export(exports):
    path = BY_NAME["digits_early_exit"]
    model, runner = compiled(path, "none"), load_exported(exports(path))
    x = random_batch(model, 64)
    runner.set_threshold(0.0)  # every sample leaves at the first exit
    assert (runner(x).columns["exit"] == 0).all()
    runner.set_threshold(1.01)  # none leaves early
    assert (runner(x).columns["exit"] == len(model.exits) - 1).all()


def test_loading_and_running_an_export_imports_only_torch_and_the_runner(exports, tmp_path):
    folder = exports(BY_NAME["skipnet_ff"])
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(folder)!r})
        import torch, dyngraph_runner
        model = dyngraph_runner.load({str(folder)!r})
        out = model(torch.randn(5, *model.manifest["input"]["shape"]))
        assert out.logits.shape[0] == 5 and out.macs.shape == (5,)
        print(sorted(m for m in sys.modules if m.startswith("dyngraph")))
        print(("kernels" in model.manifest) == (model.kernels is not None))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runner = ("['dyngraph_runner', 'dyngraph_runner.fused', 'dyngraph_runner.state', "
              "'dyngraph_runner.steps', 'dyngraph_runner.tokens']")  # fmt: skip
    assert r.stdout.split("\n")[:2] == [runner, "True"]


def _damaged(folder, tmp_path, damage) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    damage(copy)
    with pytest.raises(ExportError) as e:
        load_exported(copy)
    assert "\n" not in str(e.value)
    return str(e.value)


def _manifest(edit):
    def damage(copy):
        m = json.loads((copy / "manifest.json").read_text())
        edit(m)
        (copy / "manifest.json").write_text(json.dumps(m))

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("{not json"), "manifest.json is damaged"),
        (_manifest(lambda m: m.update(format="dyngraph.export/0")), "this runner reads"),
        (lambda c: (c / "units" / "001.pt2").unlink(), "is missing"),
        (lambda c: (c / "units" / "001.pt2").write_bytes(b"garbage"), "cannot load the program"),
        (_manifest(lambda m: m["units"][1].update(in_shapes=[[7]])), "the manifest says [[7]]"),
        (_manifest(lambda m: m["steps"][0].update(kind="teleport")), "not known to this runner"),
    ],
    ids=["no-manifest", "bad-json", "version", "missing-unit", "bad-unit", "shapes", "kind"],
)
def test_a_damaged_export_is_a_one_line_error(exports, tmp_path, damage, message):
    folder = exports(BY_NAME["digits_early_exit"])
    assert message in _damaged(folder, tmp_path, damage)


def test_a_wrong_input_is_a_one_line_error(exports):
    runner = load_exported(exports(BY_NAME["digits_early_exit"]))
    with pytest.raises(ValueError, match="expected input"):
        runner(torch.randn(3, 5))


#: specs whose decisions the fused kernels take in the runner: max_prob and entropy exits,
#: per-token exits and halting (query grids, row writes)
KERNEL_SITES = ("msdnet_early_exit", "deebert_transformer", "calm_tagger", "ut_tagger",
                "skipnet_ff", "blockdrop", "skipnet_rnn")  # fmt: skip


@pytest.mark.parametrize("name", KERNEL_SITES)
def test_the_runner_gives_the_same_without_the_fused_kernels(name, exports, monkeypatch):
    """`DYNGRAPH_KERNELS=0` (or kernels that do not load): the ATen ops, the same results."""
    model = compiled(BY_NAME[name], "none")
    folder = exports(BY_NAME[name])
    if "kernels" not in json.loads((folder / "manifest.json").read_text()):
        pytest.fail("the export has no kernels: the compiled model's could not be built here")
    assert load_exported(folder).kernels is not None
    assert (fused.MAX_PROB_BELOW, fused.ENTROPY_ABOVE, fused.AT_LEAST) == (
        kernels.MAX_PROB_BELOW, kernels.ENTROPY_ABOVE, kernels.AT_LEAST)  # fmt: skip
    monkeypatch.setenv("DYNGRAPH_KERNELS", "0")
    runner = load_exported(folder)
    assert runner.kernels is None
    for b in (7, 256):
        _same(model, runner, random_batch(model, b, seed=b))


@pytest.mark.parametrize(
    "damage",
    [
        _manifest(lambda m: m["kernels"].update(torch="1.0.0")),
        _manifest(lambda m: m["kernels"].update(python="3.99")),
        lambda c: (c / "dyngraph_runner" / "dyngraph_kernels.so").write_bytes(b"garbage"),
        lambda c: (c / "dyngraph_runner" / "dyngraph_kernels.so").unlink(),
    ],
    ids=["other-torch", "other-python", "damaged", "missing"],
)
def test_kernels_that_do_not_load_leave_the_aten_ops(exports, tmp_path, damage):
    """An export's kernels built for another torch or machine, damaged or missing: a warning
    says why, and the runner still runs it as the compiled model."""
    path = BY_NAME["msdnet_early_exit"]
    copy = tmp_path / "copy"
    shutil.copytree(exports(path), copy)
    damage(copy)
    with pytest.warns(UserWarning, match="fused decision kernels are not used"):
        runner = load_exported(copy)
    assert runner.kernels is None
    model = compiled(path, "none")
    _same(model, runner, random_batch(model, 64, seed=3))


def test_gamma_is_settable_on_an_export(exports):
    path = BY_NAME["composer_wide_digits"]
    model, runner = compiled(path, "none"), load_exported(exports(path))
    x = random_batch(model, 200)
    seen = []
    try:
        for gamma in (0.0, 4.0):
            model.set_gamma(gamma)
            runner.set_gamma(gamma)
            want, got = model(x), runner(x)
            assert torch.equal(got.columns["choices"], want.trace.columns["choices"])
            assert torch.equal(got.macs, model.per_input_macs(want.trace))
            seen.append(got.columns["choices"])
        assert not torch.equal(*seen)  # the preference reached the controller
        with pytest.raises(ValueError, match="no preference"):
            runner.set_gamma(1.0, preference="speed of light")
    finally:
        model.load_decision_settings({"gamma": {}})


def test_a_program_runs_as_a_function_of_the_same_structure():
    """The runner calls each program as a plain function (runner._direct: no pytree packing,
    torch's own op bindings) and gets what the module returns: a tensor, a tuple, or nested
    states (an LSTM's (h, c)), with the same values."""
    from dyngraph.runtime.runner import _direct

    class Nested(torch.nn.Module):
        def forward(self, x, h):
            return torch.nn.functional.linear(x, torch.ones(3, 3)) + 1, (h.tanh(), h * 2)

    x = torch.randn(4, 3)
    cases = [(Nested(), (x, x)), (torch.nn.ReLU(), (x,)), (torch.nn.LSTMCell(3, 3), (x,))]
    tree = torch.utils._pytree
    for module, args in cases:
        f = _direct(torch.export.export(module.eval(), args))
        got, want = f(*args), module(*args)
        assert tree.tree_structure(got) == tree.tree_structure(want)
        for a, b in zip(tree.tree_leaves(got), tree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, b)


def test_export_is_part_of_the_public_api():
    assert dg.export is export and dg.load_exported is load_exported


def test_the_export_command_writes_a_folder_or_names_what_it_cannot(tmp_path, capsys):
    from dyngraph.cli import main

    assert main(["export", str(BY_NAME["skipnet_ff"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "manifest.json").exists()
    (tmp_path / "b").write_text("a file")
    assert main(["export", str(BY_NAME["ut_tagger"]), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a folder" in err and "\n" not in err
    assert (tmp_path / "b").read_text() == "a file"  # (nothing lost)


@pytest.mark.parametrize("name", ONE_GRAPH)
def test_one_graph_at_batch_1_takes_each_input_its_own_path(name, exports):
    """torch.cond holds the decisions: one program, every input's own exit or gates."""
    model = compiled(BY_NAME[name], "none")
    program = load_exported(exports(BY_NAME[name])).single()
    # (8 inputs: an exported torch.cond runs its branches through the compiler in eager mode,
    # about 2 s a call here)
    x, pad = random_batch(model, 8, seed=2), model.spec.input.pad_id
    seen = set()
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if pad is not None:  # a padded sequence runs without its padding
            xi = xi[:, : int((xi != pad).sum())]
        want = model(x[i : i + 1])
        z, decided = program(xi)
        torch.testing.assert_close(z, want.logits[:, : z.shape[1]] if z.dim() == 3 else want.logits,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
        column = want.trace.columns["exit" if model.exits else "gates"][0].view(-1)
        assert torch.equal(decided, column.cpu())
        seen.add(tuple(decided.tolist()))
    assert len(seen) >= 2  # inputs took different paths through the one graph


def test_plans_without_a_one_graph_form_say_why(exports):
    runner = load_exported(exports(BY_NAME["pabee_transformer"]))
    with pytest.raises(ValueError, match="patience"):  # (the runner's own ExportError)
        runner.single()


@pytest.mark.slow  # AOTInductor compiles each unit to C++ (about a minute a spec here)
@pytest.mark.parametrize("path", SPECS, ids=spec_id)
def test_an_aot_export_runs_as_the_compiled_model(path, tmp_path):
    """Every spec, with its units (and rows programs) compiled: also sequences of mixed
    lengths, whose slice of the batch to a length is not contiguous (compiled code would
    misread it)."""
    model = compiled(path, "none")
    runner = load_exported(export(model, tmp_path / "aot", aot=True, single=False))
    assert all(u["aoti"] for u in runner.manifest["units"])
    assert all(u["rows_aoti"] for u in runner.manifest["units"] if u.get("rows"))
    for b in (1, 7, 256):
        _same(model, runner, random_batch(model, b, seed=b))


def test_tokens_over_a_threshold_export_too(tmp_path):
    """Mixture-of-Depths by threshold (mod_tagger routes by capacity): sequences route
    different numbers of tokens, which the body runs as sequences of those lengths."""
    text = BY_NAME["mod_tagger"].read_text().replace("capacity: 0.125", "threshold: 0.5")
    assert "threshold: 0.5" in text
    (tmp_path / "spec.yaml").write_text(text)
    torch.manual_seed(0)
    model = dg.compile(tmp_path / "spec.yaml", backend="none").eval()
    diversify(model)
    runner = load_exported(export(model, tmp_path / "out", single=False))
    x = random_batch(model, 64, seed=3)
    want, got = model(x), runner(x)
    counts = want.trace.columns["gates"]
    assert len(set(counts.flatten().tolist())) > 3  # sequences routed different numbers
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.columns["gates"], counts)
    assert torch.equal(got.unit_counts, want.trace.unit_counts)
    assert torch.equal(got.macs, model.per_input_macs(want.trace))


def test_an_export_written_before_the_runner_package_still_loads(exports, tmp_path):
    """Exports used to hold the runner as one file, dyngraph_runner.py (same format)."""
    old = tmp_path / "old"
    shutil.copytree(exports(BY_NAME["digits_early_exit"]), old)
    pkg = old / "dyngraph_runner"
    init = (pkg / "__init__.py").read_text()
    init = init.replace("from . import fused\n", "fused = types.SimpleNamespace(load=load)\n")
    init = init.replace("from .steps import STEPS as _STEPS\n", "_STEPS = STEPS\n")
    init = init.replace("from .state import Pass\n", "")
    init = init.replace("from .tokens import TOKEN_STEPS\n", "TOKEN_STEPS = {}\n")
    steps = "".join(
        line
        for f in ("fused.py", "state.py", "steps.py")
        for line in (pkg / f).read_text().splitlines(True)
        if not line.startswith(("from .fused import", "from .state import"))
    )
    text = "import types\n" + steps + init
    text = text.replace("from __future__ import annotations\n", "")
    (old / "dyngraph_runner.py").write_text(text)
    shutil.rmtree(pkg)
    model = compiled(BY_NAME["digits_early_exit"], "none")
    x = random_batch(model, 9)
    torch.testing.assert_close(load_exported(old)(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
    shutil.rmtree(old)
    old.mkdir()
    with pytest.raises(ExportError, match="no dyngraph_runner/"):
        load_exported(old)
