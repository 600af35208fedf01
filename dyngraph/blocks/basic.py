"""Static built-in blocks: layers, MLPs, residual blocks, heads, glimpses."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, StrictInt
from torch import nn

from .registry import (
    BlockParams,
    Shape,
    ShapeError,
    in_features,
    is_sequence,
    register_block,
)

_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}
ActName = Literal["relu", "gelu", "tanh", "sigmoid", "silu", "identity"]


class NoParams(BlockParams):
    pass


def _register_activation(name: str) -> None:
    def build(p: NoParams, shapes: list[Shape]) -> nn.Module:
        return _ACTS[name]()

    build.__doc__ = f"Elementwise {name}."
    register_block(name, NoParams)(build)


for _name in _ACTS:
    if _name != "identity":
        _register_activation(_name)


@register_block("identity", NoParams)
def identity(p: NoParams, shapes: list[Shape]) -> nn.Module:
    """Returns its input."""
    return nn.Identity()


class LinearParams(BlockParams):
    in_: int | None = Field(None, alias="in", gt=0)
    out: int = Field(gt=0)
    bias: bool = True


@register_block("linear", LinearParams)
def linear(p: LinearParams, shapes: list[Shape]) -> nn.Module:
    """A fully connected layer over the last dimension (`in` inferred when left out)."""
    return nn.Linear(in_features(shapes, p.in_), p.out, bias=p.bias)


class Conv2dParams(BlockParams):
    in_: int | None = Field(None, alias="in", gt=0)
    out: int = Field(gt=0)
    kernel: int = Field(3, gt=0)
    stride: int = Field(1, gt=0)
    padding: int | None = Field(None, ge=0)
    bias: bool = True


def _check_image(shapes: list[Shape], given: int | None) -> int:
    if len(shapes[0]) != 3:
        raise ShapeError(f"expects a [channels, height, width] input, got {list(shapes[0])}")
    c = shapes[0][0]
    if given is not None and given != c:
        raise ShapeError(f"in={given} but its input has {c} channels (shape {list(shapes[0])})")
    return c


@register_block("conv2d", Conv2dParams)
def conv2d(p: Conv2dParams, shapes: list[Shape]) -> nn.Module:
    """A 2-D convolution on [C, H, W] inputs; padding defaults to kernel // 2."""
    c = _check_image(shapes, p.in_)
    pad = p.kernel // 2 if p.padding is None else p.padding
    return nn.Conv2d(c, p.out, p.kernel, stride=p.stride, padding=pad, bias=p.bias)


@register_block("batchnorm", NoParams)
def batchnorm(p: NoParams, shapes: list[Shape]) -> nn.Module:
    """Batch normalization: 1-D on [C] or [C, L] inputs, 2-D on [C, H, W] inputs."""
    s = shapes[0]
    if len(s) in (1, 2):
        return nn.BatchNorm1d(s[0])
    if len(s) == 3:
        return nn.BatchNorm2d(s[0])
    raise ShapeError(f"expects an input of 1 to 3 dimensions, got {list(s)}")


@register_block("layernorm", NoParams)
def layernorm(p: NoParams, shapes: list[Shape]) -> nn.Module:
    """Layer normalization over the last dimension."""
    return nn.LayerNorm(in_features(shapes, None))


class FlattenParams(BlockParams):
    pass


@register_block("flatten", FlattenParams)
def flatten(p: FlattenParams, shapes: list[Shape]) -> nn.Module:
    """Flattens every per-sample dimension into one."""
    return nn.Flatten(1)


class PoolParams(BlockParams):
    kernel: int = Field(2, gt=0)
    stride: int | None = Field(None, gt=0)


@register_block("maxpool2d", PoolParams)
def maxpool2d(p: PoolParams, shapes: list[Shape]) -> nn.Module:
    """2-D max pooling on [C, H, W] inputs."""
    _check_image(shapes, None)
    return nn.MaxPool2d(p.kernel, p.stride)


@register_block("avgpool2d", PoolParams)
def avgpool2d(p: PoolParams, shapes: list[Shape]) -> nn.Module:
    """2-D average pooling on [C, H, W] inputs."""
    _check_image(shapes, None)
    return nn.AvgPool2d(p.kernel, p.stride)


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@register_block("global_avgpool", NoParams)
def global_avgpool(p: NoParams, shapes: list[Shape]) -> nn.Module:
    """Mean over height and width: [C, H, W] -> [C]."""
    _check_image(shapes, None)
    return GlobalPool()


class MLPParams(BlockParams):
    in_: int | None = Field(None, alias="in", gt=0)
    hidden: int = Field(gt=0)
    out: int = Field(gt=0)
    layers: int = Field(2, ge=1)
    act: ActName = "relu"


@register_block("mlp", MLPParams)
def mlp(p: MLPParams, shapes: list[Shape]) -> nn.Module:
    """`layers` linear layers with an activation between them (none after the last)."""
    d = in_features(shapes, p.in_)
    dims = [d] + [p.hidden] * (p.layers - 1) + [p.out]
    mods: list[nn.Module] = []
    for i in range(p.layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < p.layers - 1:
            mods.append(_ACTS[p.act]())
    return nn.Sequential(*mods)


class ResidualMLP(nn.Module):
    """x + W2(act(W1(norm(x)))): pre-norm residual MLP; W2 starts at zero when asked."""

    per_token = True  # each token from itself alone (registry.acts_per_token)

    def __init__(self, dim: int, hidden: int, norm: bool, act: str, zero_init: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), _ACTS[act](), nn.Linear(hidden, dim)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLPParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    hidden: int = Field(gt=0)
    norm: bool = False
    act: ActName = "relu"
    zero_init: bool = False


@register_block("residual_mlp", ResidualMLPParams)
def residual_mlp(p: ResidualMLPParams, shapes: list[Shape]) -> nn.Module:
    """A residual MLP block x + W2 act(W1 norm(x)); `norm` adds a pre-LayerNorm."""
    d = in_features(shapes, p.dim, "dim")
    return ResidualMLP(d, p.hidden, p.norm, p.act, p.zero_init)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm, projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResnetBlockParams(BlockParams):
    in_: int | None = Field(None, alias="in", gt=0)
    out: int | None = Field(None, gt=0)
    stride: int = Field(1, gt=0)


@register_block("resnet_block", ResnetBlockParams)
def resnet_block(p: ResnetBlockParams, shapes: list[Shape]) -> nn.Module:
    """ResNet basic block on [C, H, W]; `out` defaults to the input's channels."""
    c = _check_image(shapes, p.in_)
    return BasicBlock(c, p.out or c, p.stride)


def pool_tokens(x: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence [B, L, D] -> [B, D]: the mean over its tokens, the first or the
    last. A batch holds sequences of one length (the runtime groups them by length), so every
    token is valid."""
    if how == "mean":
        return x.mean(1)
    return x[:, 0] if how == "first" else x[:, -1]


class Classifier(nn.Module):
    def __init__(self, dim: int, classes: int, norm: bool, pool: str | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.fc = nn.Linear(dim, classes)
        # a plain attribute, not a module: the repr (part of checkpoints' architecture
        # fingerprint) of a vector classifier stays what it was
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) if self.pool is None else pool_tokens(x, self.pool)
        return self.fc(self.norm(x))


class TokenPool(nn.Module):
    """The `pool` block: see pool_tokens."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(x, self.how)


PoolHow = Literal["mean", "first", "last"]


class ClassifierParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    classes: int = Field(gt=0)
    norm: bool = False
    pool: PoolHow | None = Field(
        None, description="a sequence's tokens pooled first (default mean in a sequence model)"
    )


@register_block("classifier", ClassifierParams)
def classifier(p: ClassifierParams, shapes: list[Shape]) -> nn.Module:
    """A classification head: flatten (a sequence: pool its tokens), optional LayerNorm,
    linear to `classes` logits."""
    if is_sequence(shapes[0]):
        d = in_features(shapes, p.dim, "dim")
        return Classifier(d, p.classes, p.norm, p.pool or "mean")
    if p.pool is not None:
        raise ShapeError(f"pool: {p.pool} needs a sequence input [L, D], got {list(shapes[0])}")
    d = math.prod(shapes[0])
    if p.dim is not None and p.dim != d:
        raise ShapeError(f"dim={p.dim} but its input has shape {list(shapes[0])} ({d} values)")
    return Classifier(d, p.classes, p.norm)


class Glimpse(nn.Module):
    """A fixed slice of the input (no parameters, no MACs)."""

    def __init__(self, slices: list[tuple[int, int]], flatten: bool):
        super().__init__()
        self.slices = [slice(a, b) for a, b in slices]
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[(slice(None), *self.slices)]
        return y.flatten(1) if self.flatten else y


class GlimpseParams(BlockParams):
    slices: list[Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]] = Field(min_length=1)
    flatten: bool = True


@register_block("glimpse", GlimpseParams)
def glimpse(p: GlimpseParams, shapes: list[Shape]) -> nn.Module:
    """Looks at a fixed window: one [start, stop) per leading per-sample dimension."""
    s = shapes[0]
    if len(p.slices) > len(s):
        raise ShapeError(f"{len(p.slices)} slices for an input of shape {list(s)}")
    for (a, b), n in zip(p.slices, s, strict=False):
        if not 0 <= a < b <= n:
            raise ShapeError(f"slice [{a}, {b}) does not fit a dimension of size {n}")
    return Glimpse(p.slices, p.flatten)


class Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Concat(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim  # of the batched tensor

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class ConcatParams(BlockParams):
    dim: int = Field(-1, description="the per-sample dimension (0: an image's channels)")


@register_block("add", NoParams, arity=(2, None))
def add(p: NoParams, shapes: list[Shape]) -> nn.Module:
    """Sums its inputs (a skip connection); all must have the same shape."""
    if any(s != shapes[0] for s in shapes):
        raise ShapeError(f"inputs of different shapes {[list(s) for s in shapes]}")
    return Add()


@register_block("concat", ConcatParams, arity=(2, None))
def concat(p: ConcatParams, shapes: list[Shape]) -> nn.Module:
    """Concatenates its inputs along per-sample dimension `dim` (default the last; 0 stacks an
    image's channels, as MSDNet's dense connections do)."""
    n = len(shapes[0])
    if not -n <= p.dim < n:
        raise ShapeError(f"dim={p.dim} is out of range for inputs of shape {list(shapes[0])}")
    d = p.dim % n
    if any(len(s) != n or s[:d] + s[d + 1 :] != shapes[0][:d] + shapes[0][d + 1 :] for s in shapes):
        raise ShapeError(
            f"inputs differ in more than dimension {p.dim}: {[list(s) for s in shapes]}"
        )
    return Concat(d + 1)
