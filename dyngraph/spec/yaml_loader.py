"""Safe YAML loading that keeps the line and column of every node and rejects duplicate keys."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import Problem, SpecError

Mark = tuple[int, int]  # (line, col), 1-based


class LocDict(dict):
    """A dict that remembers where each key and each value stood in the file."""

    key_marks: dict[Any, Mark]
    value_marks: dict[Any, Mark]
    mark: Mark


class LocList(list):
    """A list that remembers where each item stood in the file."""

    item_marks: list[Mark]
    mark: Mark


def _mark(node: yaml.Node) -> Mark:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) building LocDict/LocList and refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):  # noqa: D102
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        self.flatten_mapping(node)
        out = LocDict()
        out.key_marks, out.value_marks, out.mark = {}, {}, _mark(node)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found an unhashable key",
                    key_node.start_mark,
                )
            if key in out:
                first = out.key_marks[key]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first defined at line {first[0]})",
                    key_node.start_mark,
                )
            out[key] = self.construct_object(value_node, deep=True)
            out.key_marks[key], out.value_marks[key] = _mark(key_node), _mark(value_node)
        return out

    def construct_sequence(self, node, deep=False):  # noqa: D102
        out = LocList(self.construct_object(child, deep=True) for child in node.value)
        out.item_marks, out.mark = [_mark(child) for child in node.value], _mark(node)
        return out


_Loader.add_constructor(
    "tag:yaml.org,2002:map", lambda loader, node: loader.construct_mapping(node)
)
_Loader.add_constructor(
    "tag:yaml.org,2002:seq", lambda loader, node: loader.construct_sequence(node)
)


def load_yaml(text: str, file: str = "<spec>") -> Any:
    """Parse YAML text safely; raise SpecError (with line and column) on malformed input."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.MarkedYAMLError as e:
        # the context (where the broken construct opened) is where the fix goes, when known
        mark = e.context_mark or e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        msg = " ".join(str(part) for part in (e.context, e.problem) if part) or str(e)
        if e.context_mark and e.problem_mark:
            msg += f" (at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})"
        raise SpecError([Problem(file, line, col, "", f"YAML: {msg}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(file, 0, 0, "", f"YAML: {e}")]) from None


def locate(data: Any, loc: tuple, key_position: bool = False) -> Mark:
    """The (line, col) of the deepest node of `data` reached by following `loc`.

    Args:
        data: the loaded document (LocDict/LocList nodes).
        loc: a path of keys and indices.
        key_position: point at the last key itself rather than its value (for unknown keys).
    """
    best: Mark = getattr(data, "mark", (1, 1))
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, LocDict) and part in node:
            marks = node.key_marks if (last and key_position) else node.value_marks
            best = marks[part]
            node = node[part]
        elif isinstance(node, LocList) and isinstance(part, int) and 0 <= part < len(node):
            best = node.item_marks[part]
            node = node[part]
        else:
            continue  # a step the data does not have (a union tag, a missing key): stay here
    return best
