"""Halting steps: modules `forward(state, x) -> state` with a `state_shape`.

They are written with nn.Linear and matmuls (not fused RNN kernels) so that fvcore and
FlopCounterMode both count them exactly.
"""

from __future__ import annotations

import functools
import math

import torch
from pydantic import Field
from torch import nn

from .registry import BlockParams, Shape, ShapeError, in_features, register_block


class GRUStep(nn.Module):
    """A GRU cell, state first: h' = (1 - z) * n + z * h; initialized as nn.GRUCell."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(in_dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.state_shape: Shape = (dim,)
        bound = 1 / math.sqrt(dim)  # nn.GRUCell's init: every weight U(-1/sqrt(hidden), +)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        xr, xz, xn = self.x2h(x).chunk(3, dim=1)
        hr, hz, hn = self.h2h(h).chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class StepParams(BlockParams):
    dim: int = Field(gt=0)
    in_: int | None = Field(None, alias="in", gt=0)


@register_block("gru_step", StepParams, role="step")
def gru_step(p: StepParams, shapes: list[Shape]) -> nn.Module:
    """A GRU cell as a halting step (ACT); state of size `dim`, input size inferred."""
    return GRUStep(in_features(shapes, p.in_), p.dim)


class RNNStep(nn.Module):
    """An Elman cell: h' = tanh(W x + U h)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.state_shape: Shape = (dim,)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.x2h(x) + self.h2h(h))


@register_block("rnn_step", StepParams, role="step")
def rnn_step(p: StepParams, shapes: list[Shape]) -> nn.Module:
    """A plain tanh RNN cell as a halting step."""
    return RNNStep(in_features(shapes, p.in_), p.dim)


@functools.cache
def measurement_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """The Gaussian sensing matrix A (m x n, unit-norm columns) of sparse recovery, from a seed."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, device="cpu") / math.sqrt(m)  # cached: never on meta
    return a / a.norm(dim=0, keepdim=True)


class ListaLayer(nn.Module):
    """Residual-form LISTA: x <- soft(x + W (y - A x), theta), A fixed, W and theta learned."""

    def __init__(self, m: int, n: int, seed: int, lam: float):
        super().__init__()
        if torch.empty(0).is_meta:  # built on the meta device (validation): shapes only
            a, lip = torch.empty(m, n), 1.0
        else:
            a = measurement_matrix(m, n, seed).clone()
            lip = float(torch.linalg.matrix_norm(a, ord=2) ** 2)
        self.register_buffer("A", a)
        self.W = nn.Parameter(a.t().clone() / lip)  # ISTA's step at init
        self.theta = nn.Parameter(torch.tensor(lam / lip))
        self.state_shape: Shape = (n,)

    stop_features_dim = 4

    def stop_features(self, x: torch.Tensor, y: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """What an L2S stop policy sees after this layer: log residual norm ||y - A x||, log step
        size ||x - x_prev||, log ||x||_1, log ||y||^2 (Chen et al.'s features)."""
        eps = 1e-6
        return torch.stack(
            [
                torch.log((y - x @ self.A.t()).norm(dim=1) + eps),
                torch.log((x - prev).norm(dim=1) + eps),
                torch.log(x.abs().sum(1) + eps),
                torch.log(y.pow(2).sum(1) + eps),
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = y - x @ self.A.t()
        z = x + r @ self.W.t()
        return torch.sign(z) * torch.relu(z.abs() - self.theta)


class ListaParams(BlockParams):
    m: int = Field(gt=0)
    n: int = Field(gt=0)
    seed: int = 0
    lam: float = Field(0.1, ge=0)


@register_block("lista_layer", ListaParams, role="step")
def lista_layer(p: ListaParams, shapes: list[Shape]) -> nn.Module:
    """One LISTA layer (L2S); its input is the measurement y of size m, its state x of size n."""
    if tuple(shapes[0]) != (p.m,):
        raise ShapeError(f"m={p.m} but its input (the measurement y) has shape {list(shapes[0])}")
    return ListaLayer(p.m, p.n, p.seed, p.lam)


class FlagStep(nn.Module):
    """A step whose input gets a first-step flag column (ACT)."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, h: torch.Tensor, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return self.step(h, torch.cat([x, flag], dim=1))


class StopFeatures(nn.Module):
    """L2S: the stop policy sees the step's own stop features when it has them (a LISTA layer:
    residual norm, step size, ...) or [input, state], plus the one-hot step index."""

    def __init__(self, policy: nn.Module, step: nn.Module):
        super().__init__()
        self.policy = policy
        # not a submodule: the step's weights belong to the backbone, not to the stop policy
        object.__setattr__(self, "step", step if hasattr(step, "stop_features") else None)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, prev: torch.Tensor, onehot: torch.Tensor
    ) -> torch.Tensor:
        if self.step is not None:
            f = self.step.stop_features(h, x, prev)
        else:
            f = torch.cat([x.flatten(1), h.flatten(1)], dim=1)
        return self.policy(torch.cat([f, onehot], dim=1))
