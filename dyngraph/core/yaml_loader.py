"""Safe, bounded YAML loading that keeps the line and column of every node.

Any bytes give either a document or a SpecError located at a line >= 1: the text must be UTF-8
(a decode error is reported at its line), control characters at theirs, and the document is
bounded before it is built — nesting depth, the number of nodes with aliases expanded (billion
laughs), the length of integers — so that loading takes little time and memory whatever the
file holds. Duplicate keys are an error; floats are read as YAML 1.2 reads them (`1e-3` is a
number, not the string PyYAML's YAML 1.1 makes of it).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import Problem, SpecError

Mark = tuple[int, int]  # (line, col), 1-based

#: Limits of a spec document; each is reported at the line where it is crossed.
MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # nodes of the document with every alias expanded
MAX_INT_DIGITS = 18  # fits int64: larger sizes mean nothing to a model


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


class _LimitError(yaml.MarkedYAMLError):
    """A bound of the document crossed at a node."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that builds LocDict/LocList, refuses duplicate keys and
    stops at the document bounds while composing, before anything is expanded."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):  # noqa: D102
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self._expanded(node), event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _LimitError(f"nesting deeper than {MAX_DEPTH} levels", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, event.start_mark)
        return node

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise _LimitError(
                f"the document has more than {MAX_NODES:,} nodes (aliases counted as expanded)",
                mark,
            )

    def _expanded(self, node: yaml.Node, seen: frozenset = frozenset()) -> int:
        """How many nodes `node` stands for with its aliases expanded (memoized; an alias to
        an enclosing node is an error)."""
        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        if key in seen:
            raise _LimitError("an alias refers to a node that contains it", node.start_mark)
        children: list = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        size = 1
        for child in children:
            size += self._expanded(child, seen | {key})
            if size > MAX_NODES:
                break  # already too large: the caller reports it
        self._sizes[key] = size
        return size

    def construct_yaml_int(self, node):  # noqa: D102
        digits = re.sub(r"[^0-9a-fA-F]", "", str(node.value))
        if len(digits) > MAX_INT_DIGITS:
            raise _LimitError(
                f"integer with {len(digits)} digits (at most {MAX_INT_DIGITS})", node.start_mark
            )
        return super().construct_yaml_int(node)

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
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
# YAML 1.2 floats: `1e-3` and `2E5` are numbers (YAML 1.1, PyYAML's default, wants `1.0e-3`)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _position(text: str, index: int) -> Mark:
    """The (line, col) of character `index` of `text`."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def decode(data: bytes, file: str) -> str:
    """Spec bytes as text: UTF-8 (a BOM is allowed); anything else is a SpecError at its line."""
    if len(data) > MAX_BYTES:
        raise SpecError(
            [
                Problem(
                    file,
                    1,
                    1,
                    "",
                    f"the file has {len(data):,} bytes; a spec has at most {MAX_BYTES:,}",
                )
            ]
        )
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if data.startswith(bom):
            raise SpecError([Problem(file, 1, 1, "", f"the file is {name} text; save it as UTF-8")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start
        line = data.count(b"\n", 0, start) + 1
        col = len(data[data.rfind(b"\n", 0, start) + 1 : start].decode("utf-8", "replace")) + 1
        raise SpecError(
            [
                Problem(
                    file,
                    line,
                    col,
                    "",
                    f"not UTF-8 text: byte 0x{data[start]:02x} ({e.reason}); save the file as UTF-8",
                )
            ]
        ) from None


def load_yaml(text: str, file: str = "<spec>") -> Any:
    """Parse YAML text safely; raise SpecError (with line and column) on malformed input."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.reader.ReaderError as e:  # a control character: a position, not a mark
        line, col = _position(text, e.position)
        msg = f"YAML: control character #x{e.character:04x} is not allowed in a spec"
        raise SpecError([Problem(file, line, col, "", msg)]) from None
    except yaml.MarkedYAMLError as e:
        # the context (where the broken construct opened) is where the fix goes, when known
        mark = e.context_mark or e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = " ".join(str(part) for part in (e.context, e.problem) if part) or str(e)
        if e.context_mark and e.problem_mark:
            msg += f" (at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})"
        raise SpecError([Problem(file, line, col, "", f"YAML: {msg}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(file, 1, 1, "", f"YAML: {e}")]) from None
    except RecursionError:  # bounded by MAX_DEPTH; kept as a last guard
        raise SpecError([Problem(file, 1, 1, "", "YAML: nested too deeply")]) from None


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
