"""What a spec's model reads and predicts: its input (vectors, images, token ids, float
sequences) and its task (classification per sample or per token, language modelling,
regression)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..core.types import Strict


class InputSpec(Strict):
    """One sample's shape; the batch dimension is implicit.

    A sequence is `{shape: [L], dtype: int64, vocab: V, pad_id: 0}` (token ids, padded at the
    end with `pad_id`) or `{shape: [L, D], sequence: true}` (float vectors; their lengths are
    given with the batch). `L` is the longest sequence; shorter ones run at their own length.
    `sequence: true` is needed for floats because a [8, 16] input may as well be an image.
    """

    shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    dtype: Literal["float32", "int64"] = "float32"
    vocab: int | None = Field(None, gt=1, description="int64 inputs: the number of token ids")
    pad_id: int | None = Field(None, ge=0, description="int64 inputs: the id that pads")
    sequence: bool | None = Field(
        None, description="dimension 0 is a sequence of variable length (default: int64 inputs)"
    )

    @model_validator(mode="after")
    def _ids(self) -> InputSpec:
        if self.dtype == "int64":
            if self.vocab is None:
                raise ValueError("an int64 input (token ids) needs `vocab`")
            if len(self.shape) != 1:
                raise ValueError(f"token ids have shape [L], got {self.shape}")
            if self.pad_id is not None and self.pad_id >= self.vocab:
                raise ValueError(f"pad_id {self.pad_id} is not below vocab {self.vocab}")
        elif self.vocab is not None or self.pad_id is not None:
            raise ValueError("`vocab` and `pad_id` are for int64 inputs (dtype: int64)")
        if self.sequence and self.dtype == "float32" and len(self.shape) != 2:
            raise ValueError(f"a float sequence has shape [L, D], got {self.shape}")
        if self.sequence is False and self.dtype == "int64":
            raise ValueError("token ids are a sequence")
        return self

    @property
    def is_sequence(self) -> bool:
        return bool(self.sequence) or self.dtype == "int64"


class TaskSpec(Strict):
    """`classification` (cross-entropy over `classes`; `per: token` for a label per position,
    padding ignored), `language_model` (next token over the input's vocab) or `regression`
    (MSE)."""

    type: Literal["classification", "regression", "language_model"]
    classes: int | None = Field(None, gt=1)
    per: Literal["sample", "token"] = Field(
        "sample", description="classification: one label per sequence, or one per position"
    )

    @model_validator(mode="after")
    def _classes(self) -> TaskSpec:
        if self.type == "classification" and self.classes is None:
            raise ValueError("a classification task needs `classes`")
        if self.type == "language_model" and self.per == "sample":
            object.__setattr__(self, "per", "token")  # a next-token label at every position
        if self.type == "regression" and self.per == "token":
            raise ValueError("`per: token` is for classification")
        return self

    @property
    def classifies(self) -> bool:
        return self.type != "regression"
