"""The spec format as pydantic models: top-level keys, graph nodes and the constructs.

Graph nodes are a tagged union: a string (a named module), a mapping with `type:` (an inline
module), or a mapping with exactly one construct key. Each construct's own schema lives in its
file under constructs/; this module assembles the union from the construct registry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from ..constructs import CONSTRUCTS
from ..constructs.registry import _ON_REGISTER
from ..core.types import TAG, Ident, InlineModule, Strict
from .problem import InputSpec, TaskSpec

BACKENDS = ("inductor", "aot_eager", "eager", "none")


class CompileSpec(Strict):
    """How static segments are compiled; backend `none` runs them eagerly. The default is `none`:
    on the project's CPU eager was as fast as inductor or faster in most benchmark cases
    (docs/performance.md)."""

    backend: Literal["inductor", "aot_eager", "eager", "none"] = "none"
    dynamic: bool = True


class SplitFractions(Strict):
    """How one file that serves several splits is divided (seeded by `data.seed`); the
    training split takes what is left."""

    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitFractions:
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave a part of the file for training")
        return self


class DataSpec(Strict):
    """Where the data come from: `name` for every split, or `train:`, `val:`, `test:` each
    (a built-in data set's name, or a .npz/.pt file; file paths are relative to the spec's
    folder). A built-in set has its own fixed splits; a file that serves several splits is
    divided by the seeded fractions of `split:`."""

    name: str | None = Field(None, description="a built-in data set or a file, for every split")
    train: str | None = Field(None, description="the training split: a built-in name or a file")
    val: str | None = Field(None, description="the validation split (calibration, val metric)")
    test: str | None = Field(None, description="the test split (eval, calibrate's test line)")
    split: SplitFractions = SplitFractions()
    params: dict[str, Any] = Field({}, description="built-in sets: their generator's parameters")
    seed: int = Field(
        0, ge=0, lt=2**31, description="which samples: generated sets, splits and shuffling"
    )
    fresh: bool | None = Field(
        None, description="generated sets: new samples every step (default true for them)"
    )
    n_train: int = Field(20000, gt=0, description="generated sets: size of a fixed training set")
    n_val: int = Field(2000, gt=0, description="generated sets: size of the validation split")
    n_test: int = Field(4000, gt=0, description="generated sets: size of the test split")

    @model_validator(mode="after")
    def _some_source(self) -> DataSpec:
        if self.name is None and self.train is None:
            raise ValueError(
                "name the data: `name:` (every split) or `train:` (and `val:`, `test:`)"
            )
        return self

    #: the spec's input is token ids: files keep integer x (set by the spec's validator)
    _ids: bool = PrivateAttr(False)
    _pad: int | None = PrivateAttr(None)  # and its pad id (a file's `lengths` pad with it)

    def source(self, split: str) -> str | None:
        """The built-in name or file that serves `split`."""
        return getattr(self, split) or self.name or self.train


class OptimizerSpec(Strict):
    type: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")


class ScheduleSpec(Strict):
    type: Literal["constant", "cosine", "step", "onecycle"] = "constant"
    step_size: int = Field(1000, gt=0, description="step: decay every this many steps")
    gamma: float = Field(0.1, gt=0, description="step: decay factor")
    warmup: float = Field(0.3, ge=0, le=1, description="onecycle: fraction of steps rising")


class ObjectiveSpec(Strict):
    """What every stage's loss shares; each construct's own terms take its stage options."""

    task_weight: float = Field(1.0, ge=0)
    penalty_ramp: float = Field(
        0.0, ge=0, le=1, description="fraction of the stage over which penalties ramp up from 0"
    )


class _Stage(Strict):
    """One training stage. Each construct with stage options adds them under its key
    (`gate: {decisions: sample, penalty: 0.5}`); the flat keys of earlier specs (`decisions:`,
    `explore:`, and `objective:`'s `gate_penalty`, `gate_reward`, `skipnet_alpha`,
    `blockdrop_gamma`, `curriculum_steps`, `policy_weight`, `entropy_cost`, `l2s`) are still
    read into them."""

    name: str = "train"
    steps: int | None = Field(None, gt=0)
    epochs: int | None = Field(None, gt=0)
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    trainable: list[str] = Field(
        ["all"],
        description="all, backbone, heads, controllers, a unit name, or a block name (its parameters' prefix, e.g. graph.1 for every block below graph[1])",
    )
    objective: ObjectiveSpec = ObjectiveSpec()
    grad_clip: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, v: Any) -> Any:
        """Flat keys of earlier specs (`decisions:`, `objective: {gate_penalty: ...}`) move under
        the construct that declares them."""
        if not isinstance(v, dict):
            return v
        moves = [(k, c) for c in CONSTRUCTS.values() for k in c.legacy_options]
        obj = v.get("objective")
        if not any(k in v or (isinstance(obj, dict) and k in obj) for k, _ in moves):
            return v
        v, obj = dict(v), dict(obj) if isinstance(obj, dict) else obj
        for k, c in moves:
            for src in (v, obj):
                if isinstance(src, dict) and k in src:
                    opts = v.get(c.key)
                    opts = dict(opts) if isinstance(opts, dict) else {}
                    opts.setdefault(c.legacy_options[k], src[k])
                    v[c.key] = opts
        for k, _ in moves:
            v.pop(k, None)
            if isinstance(obj, dict):
                obj.pop(k, None)
        if obj is not None:
            v["objective"] = obj
        return v

    @model_validator(mode="after")
    def _length(self) -> _Stage:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("a stage needs exactly one of `steps` or `epochs`")
        return self

    def options(self, key: str) -> Any:
        """This stage's options of construct `key` (its defaults when the stage names none)."""
        return getattr(self, key, None)


class CalibrateSpec(Strict):
    budget: float | None = Field(
        None, gt=0, le=1, description="fraction of the longest path's MACs"
    )
    temperature: bool = Field(
        True, description="fit temperature scaling per exit on the validation split"
    )


def _assemble() -> None:
    """(Re)build the classes that depend on the construct registry: graph nodes, stages, the
    spec. Called at import and after each `register_construct`, so that a construct defined
    outside the package (a test, a user's module) is part of the format."""
    g = globals()

    class RepeatNode(Strict):
        """`{repeat: K, nodes: [...]}`: the nodes unrolled K times (inline modules fresh each
        time)."""

        repeat: int = Field(ge=1)
        nodes: list[Any] = Field(min_length=1)

    nodes = {
        key: create_model(
            f"{key.capitalize()}Node",
            __base__=Strict,
            __module__=__name__,
            id=(Ident | None, None),
            inputs=(list[str] | None, None),
            **{key: (c.schema, ...)},
        )
        for key, c in CONSTRUCTS.items()
    }
    keys = ("repeat", *CONSTRUCTS)

    def tag(v: Any) -> str | None:
        if isinstance(v, str):
            return TAG + "name"
        if isinstance(v, dict):
            found = [k for k in v if k in keys]
            if len(found) == 1:
                return TAG + found[0]
            if not found and "type" in v:
                return TAG + "module"
            return None
        if isinstance(v, InlineModule):
            return TAG + "module"
        if isinstance(v, RepeatNode):
            return TAG + "repeat"
        for key, cls in nodes.items():
            if isinstance(v, cls):
                return TAG + key
        return None

    members = [
        Annotated[str, Tag(TAG + "name")],
        Annotated[InlineModule, Tag(TAG + "module")],
        Annotated[RepeatNode, Tag(TAG + "repeat")],
        *[Annotated[cls, Tag(TAG + key)] for key, cls in nodes.items()],
    ]
    node = Annotated[
        Union[tuple(members)],  # noqa: UP007
        Discriminator(
            tag,
            custom_error_type="node_kind",
            custom_error_message=(
                "a node is a module name, a mapping with `type:`, or a mapping with exactly one "
                "of " + ", ".join(keys)
            ),
        ),
    ]
    RepeatNode.__module__, RepeatNode.__qualname__ = __name__, "RepeatNode"
    RepeatNode.model_fields["nodes"].annotation = list[node]
    RepeatNode.model_rebuild(force=True)
    stage = create_model(
        "StageSpec",
        __base__=_Stage,
        __module__=__name__,
        __doc__=_Stage.__doc__,
        **{
            c.key: (c.options, Field(default_factory=c.options, description=c.options.__doc__))
            for c in CONSTRUCTS.values()
            if c.options is not None
        },
    )
    train = create_model(
        "TrainSpec",
        __base__=_Train,
        __module__=__name__,
        __doc__=_Train.__doc__,
        stages=(list[stage], []),
    )
    spec = create_model(
        "Spec",
        __base__=_Spec,
        __module__=__name__,
        __doc__=_Spec.__doc__,
        graph=(list[node], Field(min_length=1)),
        train=(train | None, None),
    )
    # module attributes, so that pickle (torch.save of a whole model) finds the generated classes
    g.update({cls.__name__: cls for cls in nodes.values()})
    g.update(
        RepeatNode=RepeatNode,
        Node=node,
        NODE_KEYS=keys,
        StageSpec=stage,
        TrainSpec=train,
        Spec=spec,
    )


class _Train(Strict):
    """Training settings; `data` is also what `dyngraph profile` reads by default."""

    data: DataSpec
    batch_size: int = Field(128, gt=0)
    seed: int = Field(
        0,
        ge=0,
        lt=2**31,
        description="the run's randomness: initialization, sampled decisions and the order of "
        "training batches (evaluation splits follow data.seed)",
    )
    backend: Literal["inductor", "aot_eager", "eager", "none"] = Field(
        "none", description="backend while training (eager is quickest to start on small models)"
    )
    stages: list[Any] = []  # (typed by _assemble)
    eval_every: int = Field(500, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    calibrate: CalibrateSpec = CalibrateSpec()


class _Spec(Strict):
    """A dyngraph spec (schema version 1)."""

    dyngraph: Literal[1] = Field(description="schema version; must be 1")

    @field_validator("dyngraph", mode="before")
    @classmethod
    def _version_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):  # True == 1 in Python; a version is not a boolean
            raise ValueError(f"the schema version is the number 1, not {v!r}")
        return v

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputSpec
    task: TaskSpec
    modules: dict[Ident, InlineModule] = {}
    controllers: dict[Ident, InlineModule] = {}
    graph: list[Any] = Field(min_length=1)  # (typed by _assemble)
    compile: CompileSpec = CompileSpec()
    train: Any = None  # (typed by _assemble)

    @model_validator(mode="after")
    def _task_fits_input(self) -> _Spec:
        task, inp = self.task, self.input
        if self.train is not None:
            self.train.data._ids = inp.dtype == "int64"
            self.train.data._pad = inp.pad_id
        if task.per == "token" and not inp.is_sequence:
            raise ValueError(
                "a task `per: token` needs a sequence input (dtype: int64 or sequence: true)"
            )
        if task.type == "language_model":
            if inp.dtype != "int64":
                raise ValueError("a language model reads token ids (input dtype: int64)")
            if task.classes is None:
                object.__setattr__(task, "classes", inp.vocab)
            elif task.classes != inp.vocab:
                raise ValueError(
                    f"a language model predicts the vocab ({inp.vocab}), not {task.classes} classes"
                )
        return self


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec format, with every registered block's parameters."""
    from ..blocks import BLOCKS

    schema = globals()["Spec"].model_json_schema()
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


_assemble()
_ON_REGISTER.append(_assemble)
