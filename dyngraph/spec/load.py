"""Loading a spec: YAML (with positions) -> schema (pydantic) -> semantic and shape checks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pydantic

from ..constructs import CONSTRUCTS
from ..core.errors import Problem, SpecError, did_you_mean, format_path
from ..core.types import TAG
from ..core.yaml_loader import MAX_BYTES, decode, load_yaml, locate
from . import schema
from .schema import json_schema


def _known_keys() -> frozenset[str]:
    """(Rebuilt when a construct registered since rebuilt the schema.)"""
    return _keys_of(id(schema.Spec))


@functools.cache
def _keys_of(_spec_class: int) -> frozenset[str]:
    """Every key the spec format knows anywhere (for "did you mean" on unknown keys)."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json_schema())
    return frozenset(keys)


def problem_text(err: dict) -> tuple[str, bool]:
    """A person's wording of one pydantic error, and whether it points at a key (not a value)."""
    typ, loc, ctx = (
        err["type"],
        [p for p in err["loc"] if not str(p).startswith(TAG)],
        err.get("ctx") or {},
    )
    last = loc[-1] if loc else ""
    if typ == "missing":
        if last == "dyngraph":
            return "missing required key 'dyngraph' (the schema version: add `dyngraph: 1`)", True
        return f"missing required key '{last}'", True
    if typ == "extra_forbidden":
        if last in _known_keys():  # a real key, written where it does not belong
            return (
                f"unknown key '{last}' here (other entries take it; docs/spec.md lists each entry's keys)",
                True,
            )
        return f"unknown key '{last}'{did_you_mean(last, _known_keys())}", True
    if typ == "union_tag_invalid":
        tags = [t.strip("'") for t in str(ctx.get("expected_tags", "")).split(", ")]
        return (
            f"unknown {ctx.get('discriminator', 'tag').strip(chr(39))} '{ctx.get('tag')}'"
            f"{did_you_mean(ctx.get('tag'), tags)}; expected one of {', '.join(tags)}"
        ), False
    if typ == "union_tag_not_found":
        return f"missing key {ctx.get('discriminator', '')}", False
    if typ == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
        return (
            f"expected {expected}, got {err.get('input')!r}{did_you_mean(err.get('input'), choices)}",
            False,
        )
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")  # our own validators' messages read as they are
    msg = msg[0].lower() + msg[1:] if msg else msg
    if typ.endswith(("_type", "_parsing")) or typ in (
        "greater_than",
        "greater_than_equal",
        "less_than_equal",
        "too_short",
    ):
        return f"{msg} (got {err.get('input')!r})", False
    return msg, False


def _written(raw: Any, loc: tuple) -> tuple:
    """Where the user wrote what `loc` names: a stage's construct option given by an earlier
    spec's flat key (`decisions:`, `objective: {gate_penalty: ...}`) is reported there."""
    if len(loc) < 5 or loc[:2] != ("train", "stages") or loc[3] not in CONSTRUCTS:
        return loc
    try:
        stage = raw["train"]["stages"][loc[2]]
    except (KeyError, IndexError, TypeError):
        return loc
    if not isinstance(stage, dict) or loc[3] in stage:
        return loc
    for old, new in CONSTRUCTS[loc[3]].legacy_options.items():
        if new == loc[4]:
            for where in ((), ("objective",)):
                holder = stage.get(where[0]) if where else stage
                if isinstance(holder, dict) and old in holder:
                    return (*loc[:3], *where, old, *loc[5:])
    return loc


def _schema_problems(raw: Any, file: str, e: pydantic.ValidationError) -> list[Problem]:
    out = []
    for err in e.errors():
        loc = _written(raw, tuple(p for p in err["loc"] if not str(p).startswith(TAG)))
        msg, key = problem_text(err)
        if err["type"] == "missing":  # point at the mapping that lacks it
            line, col = locate(raw, loc[:-1])
        else:
            line, col = locate(raw, loc, key_position=key)
        out.append(Problem(file, line, col, format_path(loc), msg))
    return out


def parse_spec(source: str | Path | dict, file: str | None = None) -> tuple[Any, Any, str]:
    """YAML and schema only: the validated Spec, the raw document (with positions), the file name."""
    if isinstance(source, dict):
        raw, file = source, file or "<dict>"
    else:
        text, name = _read(source)
        file = file or name
        raw = load_yaml(text, file)
    if not isinstance(raw, dict):
        raise SpecError(
            [
                Problem(
                    file,
                    1,
                    1,
                    "",
                    "a spec is a mapping of keys (dyngraph, name, input, task, graph, ...)",
                )
            ]
        )
    try:
        spec = schema.Spec.model_validate(raw)
    except pydantic.ValidationError as e:
        raise SpecError(_schema_problems(raw, file, e)) from None
    return spec, raw, file


def _read(source: str | Path) -> tuple[str, str]:
    if isinstance(source, Path) or (
        "\n" not in str(source) and str(source).endswith((".yaml", ".yml"))
    ):
        p = Path(source)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_BYTES + 1)  # a larger file is refused without reading it all
        except OSError as e:
            raise SpecError(
                [Problem(str(source), 1, 1, "", f"cannot read: {e.strerror or e}")]
            ) from None
        return decode(data, str(source)), str(source)
    return str(source), "<string>"


def resolve_data_files(spec: Any, file: str) -> None:
    """Data files named in a spec are relative to the spec's folder (the working directory for
    a spec given as text or a dict): made absolute here, so that every command finds them."""
    from ..data.sets import is_file_name

    if spec.train is None:
        return
    folder = Path(file).resolve().parent if Path(file).is_file() else Path.cwd()
    d = spec.train.data
    for key in ("name", "train", "val", "test"):
        src = getattr(d, key)
        if is_file_name(src) and not Path(src).is_absolute():
            setattr(d, key, str(folder / src))
