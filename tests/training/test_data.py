"""A user's own data: splits named per file, one file split by seeded fractions, paths relative to
the spec, meta columns; and training from Python on tensors, Datasets and DataLoaders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dyngraph as dg
from dyngraph.cli import main
from dyngraph.compiler.names import leaves
from dyngraph.data import load_split
from tests.conftest import ROOT

TINY = ROOT / "tests" / "fixtures" / "tiny_train.yaml"
CUSTOM = ROOT / "tests" / "fixtures" / "custom" / "custom_block.yaml"


def _make(n: int, seed: int, shuffled: bool = False) -> dict[str, np.ndarray]:
    """An easy 5-class task on 18 features (class c raises feature c), with a difficulty k."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 5, n)
    x = r.normal(size=(n, 18)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    k = r.integers(1, 4, n)
    return {"x": x, "y": r.permutation(y) if shuffled else y, "k": k}


def _spec(folder: Path, data: dict, name: str = "files") -> Path:
    spec = yaml.safe_load(TINY.read_text())
    spec["name"] = name
    spec["train"]["data"] = data
    spec["train"]["stages"] = [
        {
            "name": "st",
            "steps": 150,
            "optimizer": {"type": "adamw", "lr": 3.0e-3},
            "decisions": "straight_through",
        }
    ]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """train.npz (learnable), val.npz (labels shuffled: chance level), test.npz (learnable)."""
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "train.npz", **_make(2000, 1))
    np.savez(folder / "val.npz", **_make(400, 2, shuffled=True))
    np.savez(folder / "test.npz", **_make(400, 3))
    np.savez(folder / "all.npz", **_make(1000, 4))
    return folder


def test_each_split_comes_from_the_file_named(files, tmp_path, capsys):
    spec = _spec(files, {"train": "train.npz", "val": "val.npz", "test": "test.npz"}, "three")
    out = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    val = float(re.search(r"val metric ([\d.]+)", log).group(1))
    assert "val: val.npz (400 samples)" in log and "train: train.npz (2,000 samples)" in log
    assert val < 0.35  # the shuffled validation file, not the learnable training data
    assert main(["eval", str(spec), "--checkpoint", str(out / "final.pt")]) == 0
    ev = capsys.readouterr().out
    assert "on test: test.npz (400 samples)" in ev
    assert float(re.search(r"accuracy ([\d.]+)%", ev).group(1)) > 60  # the learnable test file
    assert "by k:" in ev and re.search(r"k = 1: \d+ inputs", ev)  # a meta column of the file
    ckpt = ["--checkpoint", str(out / "final.pt")]
    assert main(["eval", str(spec), *ckpt, "--data", str(files / "val.npz")]) == 0
    assert float(re.search(r"accuracy ([\d.]+)%", capsys.readouterr().out).group(1)) < 35
    prof = tmp_path / "prof"
    assert (
        main(["profile", str(spec), *ckpt, "--no-latency", "--no-progress", "--out", str(prof)])
        == 0
    )
    assert "test.npz" in capsys.readouterr().out
    report = (prof / "report.md").read_text()
    assert "## By `k` (a column of the data)" in report and re.search(r"\| 1 \| \d+ \| ", report)
    cal = [str(spec), *ckpt, "--budget", "0.8", "--out", str(tmp_path / "c.pt")]
    assert main(["calibrate", *cal]) == 0
    c = capsys.readouterr().out
    assert "calibrated on val: val.npz (400 samples)" in c
    assert "tested on test: test.npz (400 samples)" in c
    swapped = ["--data", str(files / "test.npz"), "--test-data", str(files / "val.npz")]
    assert main(["calibrate", *cal, *swapped]) == 0
    c = capsys.readouterr().out
    assert f"calibrated on {files / 'test.npz'} (--data" in c
    assert f"tested on {files / 'val.npz'} (--data" in c


def test_one_file_is_split_by_seeded_fractions_without_overlap(files):
    spec = dg.load_spec(
        _spec(files, {"name": "all.npz", "split": {"val": 0.2, "test": 0.1}}, "one")
    )
    d = spec.spec.train.data
    parts = {s: load_split(d, s) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [700, 200, 100]
    rows = [{tuple(r) for r in p.x.tolist()} for p in parts.values()]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert parts["val"].origin.startswith(
        "val: 20% of all.npz (200 of 1,000 samples, seeded split 0"
    )
    assert torch.equal(load_split(d, "val").x, parts["val"].x)  # the same every time
    assert set(parts["test"].meta) == {"k"}


def test_data_paths_are_relative_to_the_spec(files, tmp_path, monkeypatch, capsys):
    spec = _spec(files, {"name": "all.npz"}, "relative")
    monkeypatch.chdir(tmp_path)  # somewhere else
    assert main(["validate", str(spec)]) == 0
    assert main(["eval", str(spec)]) == 0
    assert "all.npz" in capsys.readouterr().out


def test_keys_that_mean_nothing_for_a_file_are_errors(files):
    with pytest.raises(dg.SpecError, match="`n_train` applies to generated data sets"):
        dg.load_spec(_spec(files, {"name": "all.npz", "n_train": 100}, "n_train"))
    with pytest.raises(dg.SpecError, match="`split` divides a file"):
        dg.load_spec(
            _spec(
                files,
                {"train": "train.npz", "val": "val.npz", "test": "test.npz", "split": {"val": 0.2}},
                "split",
            )
        )
    with pytest.raises(dg.SpecError, match="no such data file"):
        dg.load_spec(_spec(files, {"name": "nope.npz"}, "missing"))


def test_a_damaged_data_file_is_one_line(files, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "all.npz").write_bytes(b"not a zip")
    spec = _spec(folder, {"name": "all.npz"}, "damaged")
    assert main(["train", str(spec), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ") and "cannot read the data" in err and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "r").exists()


def _toy(n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 18, generator=g)
    y = x[:, :5].argmax(1)
    x[torch.arange(n), y] += 2
    return x, y


@pytest.mark.parametrize("kind", ["tensors", "dataset", "dataloader"])
def test_train_from_python_on_your_own_data(kind):
    x, y = _toy()
    pairs = {
        "tensors": (x[:320], y[:320]),
        "dataset": torch.utils.data.TensorDataset(x[:320], y[:320]),
        "dataloader": torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x[:320], y[:320]),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        ),
    }
    torch.manual_seed(0)
    r = dg.train(
        TINY,
        pairs[kind],
        (x[320:], y[320:]),
        stages=[
            {
                "name": "st",
                "steps": 120,
                "optimizer": {"type": "adamw", "lr": 3e-3},
                "decisions": "straight_through",
            }
        ],
        log=lambda *a: None,
    )
    assert isinstance(r, dg.TrainResult) and r.finished and r.out is None
    assert r.val["data"] == "the validation data given (64 samples)"
    assert r.val["metric"] > 0.6  # learnable, and measured on the data given
    assert r.model(x[:5]).logits.shape == (5, 5)


def test_train_a_compiled_model_in_place():
    x, y = _toy()
    torch.manual_seed(0)
    model = dg.compile(TINY, backend="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = dg.train(model, (x, y), stages=[{"name": "s", "steps": 20}], log=lambda *a: None)
    assert r.model is model and r.val == {}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_custom_block_spec_trains_by_cli_and_python(tmp_path, capsys):
    folder = tmp_path / "proj"
    shutil.copytree(CUSTOM.parent, folder)  # the block's module sits beside the spec
    spec = folder / CUSTOM.name
    assert main(["validate", str(spec)]) == 2
    assert capsys.readouterr().err.count("refused unless") == 1  # once, though repeated
    out = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(out), "--trust-imports", "--no-progress"]) == 0
    assert (out / "final.pt").exists()
    assert main(["eval", str(spec), "--checkpoint", str(out / "final.pt"), "--trust-imports"]) == 0
    assert "accuracy" in capsys.readouterr().out
    x, y = _toy()
    r = dg.train(spec, (x, y), trust_imports=True, log=lambda *a: None)
    first = next(leaves(r.model.blocks))[1]
    assert r.finished and type(first).__name__ in {"Linear", "GatedResidual"}
    assert any(type(m).__name__ == "GatedResidual" for m in r.model.modules())
    with pytest.raises(dg.SpecError, match="refused unless"):
        dg.train(spec, (x, y), log=lambda *a: None)


def test_the_readme_training_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "dg.train(" in b)
    monkeypatch.chdir(ROOT)  # the example names a spec by its path in the repository
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert scope["r"].val["data"] == "the validation data given (64 samples)"
    assert scope["out"].logits.shape == (4, 5)


def test_data_without_labels_or_of_another_kind_is_refused():
    from dyngraph.data import DataError

    x, _ = _toy()
    for bad, text in (
        (x, "need as many labels"),
        (42, "expected (x, y) tensors"),
        ("digits", "got a name"),
    ):
        with pytest.raises(DataError, match=re.escape(text)):
            dg.train(TINY, bad, log=lambda *a: None)
