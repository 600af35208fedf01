"""A user's mistakes on the command line: one line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dyngraph.cli import main
from dyngraph.training import train
from tests.conftest import ROOT

TINY = ROOT / "tests" / "fixtures" / "tiny_train.yaml"
DIGITS = ROOT / "specs" / "digits_early_exit.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(TINY, out=out, stage_steps=5, log=lambda *a: None)
    return out


def _one_line_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    (folder / "random.pt").write_bytes(os.urandom(4000))
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes(good.read_bytes()[:3000])
    (folder / "folder.pt").mkdir(exist_ok=True)
    return {
        "random": folder / "random.pt",
        "empty": folder / "empty.pt",
        "truncated": folder / "truncated.pt",
        "folder": folder / "folder.pt",
        "missing": folder / "missing.pt",
        "yaml": TINY,
    }


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "folder", "missing", "yaml"])
@pytest.mark.parametrize("command", ["eval", "calibrate", "profile"])
def test_bad_checkpoints_are_one_line(run, tmp_path, capsys, kind, command):
    ckpt = _bad_checkpoints(tmp_path, run / "final.pt")[kind]
    extra = {"calibrate": ["--budget", "0.5"], "profile": ["--no-latency", "--n", "16"]}
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _one_line_error(
        capsys,
        command,
        str(TINY),
        "--checkpoint",
        str(ckpt),
        *extra.get(command, []),
        *(["--out", str(tmp_path / "out")] if command != "eval" else []),
    )
    assert err.startswith(f"error: checkpoint {ckpt}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("kind", ["random", "truncated", "folder"])
def test_resume_from_a_bad_checkpoint_is_one_line(run, tmp_path, capsys, kind):
    bad = _bad_checkpoints(tmp_path, run / "final.pt")[kind]
    folder = tmp_path / "resume"
    folder.mkdir()
    target = folder / "checkpoint.pt"
    if bad.is_dir():
        target.mkdir()
    else:
        target.write_bytes(bad.read_bytes())
    err = _one_line_error(
        capsys, "train", str(TINY), "--out", str(folder), "--resume", "--no-progress"
    )
    assert "checkpoint" in err
    assert not (folder / "final.pt").exists()


def test_a_checkpoint_of_another_spec_is_refused_by_name(run, tmp_path, capsys):
    err = _one_line_error(capsys, "eval", str(DIGITS), "--checkpoint", str(run / "final.pt"))
    assert "of spec 'tiny_train'" in err and "not of 'digits_early_exit'" in err
    # the same shapes, another architecture (an activation): still refused
    spec = yaml.safe_load(TINY.read_text())
    spec["graph"][1]["gate"]["body"]["act"] = "gelu"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(spec))
    err = _one_line_error(capsys, "eval", str(other), "--checkpoint", str(run / "final.pt"))
    assert "architecture" in err
    # a plain state dict of the wrong shapes is named too
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.pt")
    err = _one_line_error(capsys, "eval", str(TINY), "--checkpoint", str(tmp_path / "plain.pt"))
    assert "does not fit 'tiny_train'" in err


def test_a_changed_threshold_keeps_the_checkpoint(run, tmp_path, capsys):
    text = TINY.read_text().replace("threshold: 0.8", "threshold: 0.6")
    spec = tmp_path / "tiny_train.yaml"
    spec.write_text(text)
    assert main(["eval", str(spec), "--checkpoint", str(run / "final.pt")]) == 0


def _calibrate(run: Path, budget: str, out: Path) -> list[str]:
    return [
        "calibrate",
        str(TINY),
        "--checkpoint",
        str(run / "final.pt"),
        f"--budget={budget}",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("budget", ["2.0", "-1", "nan", "0", "inf", "half"])
def test_out_of_range_budget(run, tmp_path, capsys, budget):
    err = _one_line_error(capsys, *_calibrate(run, budget, tmp_path / "c.pt"))
    assert "--budget" in err
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("steps", ["0", "-5", "x"])
def test_max_steps_below_one(tmp_path, capsys, steps):
    err = _one_line_error(
        capsys, "train", str(TINY), "--out", str(tmp_path / "r"), f"--max-steps={steps}"
    )
    assert "--max-steps" in err
    assert not (tmp_path / "r").exists()


def test_unwritable_out(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "below", tmp_path / "afile", Path("/proc/dyngraph")):
        err = _one_line_error(
            capsys, "profile", str(TINY), "--no-latency", "--n", "8", "--out", str(out)
        )
        assert err.startswith(f"error: --out {out}")
        err = _one_line_error(capsys, "train", str(TINY), "--out", str(out), "--no-progress")
        assert err.startswith(f"error: --out {out}")
    assert (tmp_path / "afile").read_text() == ""


def test_calibrate_out_is_not_a_folder(run, tmp_path, capsys):
    assert "is a folder" in _one_line_error(capsys, *_calibrate(run, "0.5", tmp_path))


def test_output_survives_a_closed_pipe():
    proc = subprocess.run(
        f"{sys.executable} -m dyngraph blocks | head -1",
        shell=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() and "Error" not in proc.stderr, proc.stderr


def _train40(out: Path, *extra: str) -> int:
    """`dyngraph train` of the tiny spec, every stage shortened to 40 steps."""
    return main(
        ["train", str(TINY), "--out", str(out), "--stage-steps", "40", "--no-progress", *extra]
    )


def test_max_steps_pauses_and_resume_reaches_the_uninterrupted_weights(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train40(full) == 0
    assert _train40(cut, "--max-steps", "25") == 0
    assert not (cut / "final.pt").exists()
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["global_step"] == 25
    assert _train40(cut, "--max-steps", "30", "--resume") == 0
    assert not (cut / "final.pt").exists()
    assert _train40(cut, "--resume") == 0
    a = torch.load(full / "final.pt", weights_only=True)["model"]
    b = torch.load(cut / "final.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_stage_length_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(
            [
                "train",
                str(TINY),
                "--out",
                str(out),
                "--stage-steps",
                "10",
                "--max-steps",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    err = _one_line_error(
        capsys, "train", str(TINY), "--out", str(out), "--resume", "--no-progress"
    )
    assert "stage_steps=10" in err
