"""Types shared by the spec schema and the constructs' own schemas."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

#: Union tags start with this character so that they can be told from keys in error paths.
TAG = "\u00b7"

Ident = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


#: How every mapping of a spec is validated: unknown keys are errors; no coercion (a boolean is
#: not an integer, "3" is not a number, 3.0 is not an integer; an integer is a valid float);
#: `.nan` and `.inf` are refused (a field where a non-finite value means something says so).
SPEC_CONFIG = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


class Strict(BaseModel):
    """A spec mapping: unknown keys are rejected, values are not coerced."""

    model_config = SPEC_CONFIG


class InitSpec(Strict):
    """A block's weights from a checkpoint: the tensors under `prefix` (`{name}`: the block's
    own dotted name, e.g. `blocks.{name}`)."""

    checkpoint: str
    prefix: str = ""


class InlineModule(BaseModel):
    """An inline block: `{type: NAME, ...params}`; the params are checked by the block's model."""

    model_config = ConfigDict(extra="allow")
    type: str
    id: Ident | None = None
    inputs: list[str] | None = None
    init: InitSpec | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _ref_tag(v: Any) -> str | None:
    if isinstance(v, str):
        return TAG + "name"
    if isinstance(v, dict | InlineModule):
        return TAG + "inline"
    return None


#: A module: the name of one under `modules:` (or `controllers:`), or an inline block.
ModuleRef = Annotated[
    Union[Annotated[str, Tag(TAG + "name")], Annotated[InlineModule, Tag(TAG + "inline")]],  # noqa: UP007
    Discriminator(
        _ref_tag,
        custom_error_type="module_ref",
        custom_error_message="expected a module name or a mapping with `type:`",
    ),
]
