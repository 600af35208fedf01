"""The spec format as pydantic models: top-level keys, graph nodes and the constructs.

Graph nodes are a tagged union: a string (a named module), a mapping with `type:` (an inline
module), or a mapping with exactly one construct key. Each construct's own schema lives in its
file under constructs/; this module assembles the union from the construct registry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, create_model, model_validator

from ..constructs import CONSTRUCTS
from .types import TAG, Ident, InlineModule, Strict

BACKENDS = ("inductor", "aot_eager", "eager", "none")


class RepeatNode(Strict):
    """`{repeat: K, nodes: [...]}`: the nodes unrolled K times (inline modules fresh each time)."""

    repeat: int = Field(ge=1)
    nodes: list[Node] = Field(min_length=1)


_CONSTRUCT_NODES = {
    key: create_model(
        f"{key.capitalize()}Node",
        __base__=Strict,
        id=(Ident | None, None),
        inputs=(list[str] | None, None),
        **{key: (c.schema, ...)},
    )
    for key, c in CONSTRUCTS.items()
}
NODE_KEYS = ("repeat", *CONSTRUCTS)


def _node_tag(v: Any) -> str | None:
    if isinstance(v, str):
        return TAG + "name"
    if isinstance(v, dict):
        keys = [k for k in v if k in NODE_KEYS]
        if len(keys) == 1:
            return TAG + keys[0]
        if not keys and "type" in v:
            return TAG + "module"
        return None
    if isinstance(v, InlineModule):
        return TAG + "module"
    if isinstance(v, RepeatNode):
        return TAG + "repeat"
    for key, cls in _CONSTRUCT_NODES.items():
        if isinstance(v, cls):
            return TAG + key
    return None


_members = [
    Annotated[str, Tag(TAG + "name")],
    Annotated[InlineModule, Tag(TAG + "module")],
    Annotated[RepeatNode, Tag(TAG + "repeat")],
    *[Annotated[cls, Tag(TAG + key)] for key, cls in _CONSTRUCT_NODES.items()],
]
Node = Annotated[
    Union[tuple(_members)],  # noqa: UP007
    Discriminator(
        _node_tag,
        custom_error_type="node_kind",
        custom_error_message=(
            "a node is a module name, a mapping with `type:`, or a mapping with exactly one of "
            + ", ".join(NODE_KEYS)
        ),
    ),
]
RepeatNode.model_rebuild()


class InputSpec(Strict):
    """One sample's shape; the batch dimension is implicit."""

    shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)


class TaskSpec(Strict):
    """`classification` (cross-entropy over `classes`) or `regression` (MSE)."""

    type: Literal["classification", "regression"]
    classes: int | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _classes(self) -> TaskSpec:
        if self.type == "classification" and self.classes is None:
            raise ValueError("a classification task needs `classes`")
        return self


class CompileSpec(Strict):
    """How static segments are compiled; backend `none` runs them eagerly."""

    backend: Literal["inductor", "aot_eager", "eager", "none"] = "inductor"
    dynamic: bool = True


class DataSpec(Strict):
    """A data set: a built-in name (see `dyngraph.data.DATASETS`) or a .npz/.pt file."""

    name: str
    params: dict[str, Any] = {}
    seed: int = 0


class TrainSpec(Strict):
    """Training settings; `data` is also what `dyngraph profile` reads by default."""

    data: DataSpec
    batch_size: int = Field(128, gt=0)
    seed: int = 0


class Spec(Strict):
    """A dyngraph spec (schema version 1)."""

    dyngraph: Literal[1] = Field(description="schema version; must be 1")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputSpec
    task: TaskSpec
    modules: dict[Ident, InlineModule] = {}
    controllers: dict[Ident, InlineModule] = {}
    graph: list[Node] = Field(min_length=1)
    compile: CompileSpec = CompileSpec()
    train: TrainSpec | None = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec format, with every registered block's parameters."""
    from ..blocks import BLOCKS

    schema = Spec.model_json_schema()
    variants = []
    for name, bd in sorted(BLOCKS.items()):
        sub = bd.params.model_json_schema(by_alias=True)
        props = {
            "type": {"const": name},
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"type": "string"}},
        }
        props.update(sub.get("properties", {}))
        variants.append(
            {
                "title": name,
                "description": bd.doc,
                "type": "object",
                "properties": props,
                "required": ["type", *sub.get("required", [])],
                "additionalProperties": False,
            }
        )
        for k, v in sub.get("$defs", {}).items():
            schema.setdefault("$defs", {})[k] = v
    schema["$defs"]["InlineModule"] = {"oneOf": variants}
    return schema
