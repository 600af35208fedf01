"""Broken specs: exit 2, the right line, every problem, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import dyngraph as dg
from dyngraph.cli import main
from tests.conftest import BAD, ROOT, SPECS, spec_id


def expectation(path) -> tuple[int, str]:
    """Each fixture's first line: `# expect: LINE text-in-the-message`."""
    m = re.match(r"# expect: (\d+) (.*)", path.read_text().splitlines()[0])
    assert m, f"{path} lacks its '# expect:' line"
    return int(m.group(1)), m.group(2)


def test_ten_kinds_of_broken_spec_are_kept():
    names = {p.stem for p in BAD}
    assert names >= {
        "misspelled_type",
        "unknown_reference",
        "cycle",
        "shape_mismatch",
        "duplicate_key",
        "wrong_value_type",
        "unknown_key",
        "missing_version",
        "untrusted_import",
        "malformed",
        # v2: any bytes, bounded
        "control_character",
        "tab_indent",
        "deep_nesting",
        "alias_bomb",
        "huge_integer",
        "huge_repeat",
        "huge_size",
        "bool_as_int",
        "nan_threshold",
        "bool_version",
        "missing_data_file",
        "meaningless_data_key",
    }


@pytest.mark.parametrize("path", BAD, ids=spec_id)
def test_broken_spec_reports_line_and_exits_2(path, capsys):
    line, text = expectation(path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    hits = [ln for ln in err.splitlines() if text in ln]
    assert hits, f"no message containing {text!r} in:\n{err}"
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: ", hits[0]), hits[0]


def test_cli_process_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "dyngraph", "validate", *map(str, BAD)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) >= len(BAD)


def test_all_shipped_specs_validate(capsys):
    assert main(["validate", *map(str, SPECS)]) == 0


def test_every_problem_is_reported_together():
    text = """
dyngraph: 1
name: many
input: {shape: [16]}
task: {type: classification, classes: 3}
modules:
  block: {type: residual_mlp, hidden: 8}
graph:
  - {type: linaer, out: 32}
  - blok
  - {type: mlp, hidden: 8, out: 8, colour: red}
  - {type: classifier, classes: 3}
"""
    with pytest.raises(dg.SpecError) as info:
        dg.load_spec(text)
    msgs = [p.message for p in info.value.problems]
    assert any("unknown block type 'linaer' (did you mean 'linear'?)" in m for m in msgs)
    assert any("unknown module 'blok' (did you mean 'block'?)" in m for m in msgs)
    assert any("unknown key 'colour'" in m for m in msgs)
    assert [p.line for p in info.value.problems] == sorted(p.line for p in info.value.problems)


def test_unsafe_yaml_tags_are_refused():
    with pytest.raises(dg.SpecError, match="YAML"):
        dg.load_spec("dyngraph: 1\nname: !!python/object/apply:os.system ['true']\n")


def test_trusted_import_builds_user_block():
    text = """
dyngraph: 1
name: trusted
input: {shape: [16]}
task: {type: classification, classes: 3}
graph:
  - {type: custom, target: torch.nn.Tanh}
  - {type: classifier, classes: 3}
"""
    with pytest.raises(dg.SpecError, match="refused unless"):
        dg.load_spec(text)
    model = dg.compile(text, backend="none", trust_imports=True)
    assert model.eval()(dg_input := __import__("torch").zeros(2, 16)).logits.shape == (2, 3)
    del dg_input


@pytest.mark.parametrize(
    "graph, message",
    [
        (
            "  - {type: linear, out: 8}\n  - exit: {head: {type: classifier, classes: 3}, criterion: {type: max_prob, threshold: 0.5}}\n  - {type: linear, out: 8}",
            "must end with an exit",
        ),
        (
            "  - {type: linear, out: 16}\n  - gate: {body: {type: linear, out: 8}, policy: {type: ff_gate}}\n  - {type: classifier, classes: 3}",
            "must keep its input's shape",
        ),
        (
            "  - {type: linear, out: 16, id: a}\n  - {type: add, inputs: [a]}\n  - {type: classifier, classes: 3}",
            "takes at least 2 input(s), got 1",
        ),
        (
            "  - {type: linear, out: 16, id: a}\n  - {type: linear, out: 16, inputs: [input]}\n  - {type: classifier, classes: 3}",
            "never used",
        ),
        ("  - {type: linear, out: 16}\n  - {type: classifier, classes: 4}", "the task needs [3]"),
        (
            "  - halting: {rule: act, step: {type: gru_step, dim: 8}, max_steps: 3, policy: {type: stop_mlp}}\n  - {type: classifier, classes: 3}",
            "unknown key 'policy'",
        ),
        (  # a key other entries take is not suggested as its own spelling
            "  - halting: {rule: act, prior: 0.2, step: {type: gru_step, dim: 8}, max_steps: 3}\n  - {type: classifier, classes: 3}",
            "unknown key 'prior' here (other entries take it",
        ),
        (
            "  - {type: linear, out: 16, inputs: [nope]}\n  - {type: classifier, classes: 3}",
            "unknown input 'nope'",
        ),
    ],
)
def test_semantic_errors(graph, message):
    text = f"dyngraph: 1\nname: t\ninput: {{shape: [16]}}\ntask: {{type: classification, classes: 3}}\ngraph:\n{graph}\n"
    with pytest.raises(dg.SpecError) as info:
        dg.load_spec(text)
    assert any(message in p.message for p in info.value.problems), str(info.value)


def test_schema_command_prints_json_schema(capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    titles = {v["title"] for v in schema["$defs"]["InlineModule"]["oneOf"]}
    assert {"linear", "residual_mlp", "ff_gate", "gru_step", "lista_layer"} <= titles
    assert "graph" in schema["properties"]


DIGITS = (ROOT / "specs" / "digits_early_exit.yaml").read_text()


@pytest.mark.parametrize(
    "data, line, text",
    [
        ("dyngraph: 1\nname: caf\u00e9\n".encode("latin-1"), 2, "not UTF-8 text: byte 0xe9"),
        (DIGITS.encode("utf-16"), 1, "the file is UTF-16 text"),
        (DIGITS.encode("utf-32"), 1, "the file is UTF-32 text"),
        (
            DIGITS.replace("name: digits", "name: dig\x00its").encode(),
            3,
            "control character #x0000",
        ),
        (b"dyngraph: 1\nname: x\n" + b"\xff\xfe garbage", 3, "not UTF-8 text: byte 0xff"),
        (b"\xef\xbb\xbf" + b"x" * (1 << 20), 1, "a spec has at most"),
    ],
    ids=["latin1", "utf16", "utf32", "nul", "invalid_utf8", "too_large"],
)
def test_any_bytes_give_a_line(tmp_path, capsys, data, line, text):
    path = tmp_path / "bytes.yaml"
    path.write_bytes(data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: .*{re.escape(text)}", err), err


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + DIGITS.encode())
    assert dg.load_spec(path).name == "digits_early_exit"


def test_problems_are_listed_once_and_capped():
    from dyngraph.core.errors import MAX_SHOWN

    keys = "".join(f"  k{i}: 1\n" for i in range(MAX_SHOWN + 30))
    with pytest.raises(dg.SpecError) as info:
        dg.load_spec(DIGITS + "train:\n  data: {name: digits}\n" + keys)
    assert len(info.value.problems) == MAX_SHOWN + 30
    lines = str(info.value).splitlines()
    assert len(lines) == MAX_SHOWN + 1 and lines[-1] == "... and 30 more problems"


def test_a_repeated_refusal_is_printed_once():
    text = DIGITS.replace(
        "      - {type: residual_mlp, dim: 128, hidden: 256}\n      - exit",
        "      - {type: custom, target: os.getcwd}\n      - exit",
        1,
    )
    with pytest.raises(dg.SpecError) as info:
        dg.load_spec(text)
    assert sum("refused unless" in p.message for p in info.value.problems) == 1


def test_validation_allocates_no_weights():
    import resource

    text = DIGITS.replace("hidden: 256}", "hidden: 2000000}")  # 3 x 1 GB of weights
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dg.load_spec(text)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB


def test_yaml_12_floats_are_numbers():
    text = DIGITS.replace("threshold: 0.9", "threshold: 9e-1")
    assert dg.load_spec(text).spec.graph[1].nodes[1].exit.criterion.threshold == 0.9


def test_stage_options_sit_under_their_construct_and_old_flat_keys_still_read():
    """`gate: {decisions: sample, penalty: 0.2}` and the flat keys of earlier specs give the
    same stage; a bad value under an old key is reported where it was written."""
    base = (ROOT / "tests" / "fixtures" / "tiny_train.yaml").read_text()
    old = dg.load_spec(base).spec.train.stages
    new_text = base.replace(
        "decisions: straight_through, objective: {gate_penalty: 0.05, penalty_ramp: 0.3}}",
        "gate: {decisions: straight_through, penalty: 0.05}, objective: {penalty_ramp: 0.3}}",
    ).replace(
        "decisions: sample,\n       objective: {gate_reward: skipnet}}",
        "gate: {decisions: sample, reward: skipnet}}",
    )
    assert new_text != base
    new = dg.load_spec(new_text).spec.train.stages
    assert [s.model_dump() for s in new] == [s.model_dump() for s in old]
    assert new[0].gate.penalty == 0.05 and new[1].gate.decisions == "sample"
    with pytest.raises(dg.SpecError) as e:
        dg.load_spec(base.replace("gate_penalty: 0.05", "gate_penalty: -1"))
    assert str(e.value).startswith(
        "<string>:20:63: train.stages[0].objective.gate_penalty: input should be greater than"
    )
    with pytest.raises(dg.SpecError) as e:
        dg.load_spec(new_text.replace("penalty: 0.05", "penalti: 0.05"))
    assert "train.stages[0].gate.penalti: unknown key 'penalti' (did you mean 'penalty'?)" in str(
        e.value
    )
