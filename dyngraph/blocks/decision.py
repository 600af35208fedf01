"""Decision makers: gate policies, the Composer controller, halting units, stop policies.

A decision block is built at its first use and then asked for one *site* per place that uses
it (`add_site`), so that one named controller can be shared by many gates or metalayers. A
site returns the module that runs there; its call signature depends on the block's `style`:

- gate policies, `ff`:        call(x) -> prob [B]
- gate policies, `recurrent`: call(x, h) -> (prob [B], h')       state `state_shape`
- gate policies, `oneshot`:   call(r) -> probs [B, K] (run once, at the first site)
- routers:                    call(x, h, gamma) -> (logits [B, choices], h')
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..core.types import SPEC_CONFIG
from .registry import BlockParams, Shape, ShapeError, in_sequence_model, is_sequence, register_block


def _pool_flat(x: torch.Tensor, seq: bool = False) -> torch.Tensor:
    """Images are average-pooled to their channels (as SkipNet's gates do), sequences to the
    mean of their tokens (`seq`: built in a sequence model); others flattened."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    return x.mean(1) if seq and x.dim() == 3 else x.flatten(1)


def _pooled_dim(shape: Shape) -> int:
    if is_sequence(shape):
        return shape[-1]
    return shape[0] if len(shape) == 3 else math.prod(shape)


def _gate_dim(shape: Shape, dim: int | None, who: str) -> int:
    """The width a gate sees for an input of `shape`, checked against the declared `dim`."""
    d = _pooled_dim(shape)
    if dim is not None and dim != d:
        raise ShapeError(f"{who} has dim={dim}, but its input here has shape {list(shape)}")
    return d


class LinearGRU(nn.Module):
    """A GRU cell from nn.Linear layers (counted exactly by fvcore and FlopCounterMode)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(in_dim, 3 * dim), nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xr, xz, xn = self.x2h(x).chunk(3, dim=1)
        hr, hz, hn = self.h2h(h).chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h


# ----------------------------------------------------------------------------- gate policies


def _score_mlp(dim: int, hidden: int, bias: float) -> nn.Sequential:
    """dim -> (hidden, ReLU ->) 1: a gate's or router's logit, its bias set to `bias`."""
    layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU()] if hidden else []
    layers.append(nn.Linear(hidden or dim, 1))
    net = nn.Sequential(*layers)
    nn.init.constant_(net[-1].bias, bias)
    return net


class FFGate(nn.Module):
    """SkipNet feed-forward gate: prob = sigmoid(MLP(pool(x)))."""

    style = "ff"

    def __init__(self, dim: int, hidden: int, bias: float):
        super().__init__()
        self.seq = in_sequence_model()  # pools a sequence's tokens
        self.dim = dim
        self.net = _score_mlp(dim, hidden, bias)

    def add_site(self, in_shape: Shape) -> nn.Module:
        if _pooled_dim(in_shape) != self.dim:
            raise ShapeError(
                f"the gate was built for dim={self.dim}, its input here is {list(in_shape)}"
            )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(_pool_flat(x, self.seq))).squeeze(1)


class FFGateParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    hidden: int = Field(0, ge=0)
    bias: float = 2.0


@register_block("ff_gate", FFGateParams, role="gate_policy")
def ff_gate(p: FFGateParams, shapes: list[Shape]) -> nn.Module:
    """SkipNet feed-forward gate, one per block (or shared by naming it): prob of running."""
    return FFGate(_gate_dim(shapes[0], p.dim, "ff_gate"), p.hidden, p.bias)


class RNNGate(nn.Module):
    """SkipNet recurrent gate: one GRU shared by every gate that names it."""

    style = "recurrent"

    def __init__(self, dim: int, hidden: int, bias: float):
        super().__init__()
        self.seq = in_sequence_model()  # pools a sequence's tokens
        self.dim, self.state_shape = dim, (hidden,)
        self.proj = nn.Linear(dim, hidden)
        self.cell = LinearGRU(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.constant_(self.out.bias, bias)

    def add_site(self, in_shape: Shape) -> nn.Module:
        _gate_dim(in_shape, self.dim, "rnn_gate")
        return self

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(torch.relu(self.proj(_pool_flat(x, self.seq))), h)
        return torch.sigmoid(self.out(h)).squeeze(1), h


class RNNGateParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    hidden: int = Field(16, gt=0)
    bias: float = 2.0


@register_block("rnn_gate", RNNGateParams, role="gate_policy")
def rnn_gate(p: RNNGateParams, shapes: list[Shape]) -> nn.Module:
    """SkipNet recurrent gate: a GRU shared by the gates that name it, state carried across them."""
    return RNNGate(_gate_dim(shapes[0], p.dim, "rnn_gate"), p.hidden, p.bias)


class BlockDropPolicy(nn.Module):
    """BlockDrop policy network: every gate's probability from one read of `reads`, at once."""

    style = "oneshot"

    def __init__(self, reads: str, read_shape: Shape, hidden: int, bias: float):
        super().__init__()
        self.seq = in_sequence_model()  # pools a sequence's tokens
        self.reads, self.read_shape, self.hidden, self.bias = reads, read_shape, hidden, bias
        self.sites = 0
        self.net: nn.Module | None = None

    def add_site(self, in_shape: Shape) -> int:
        if self.net is not None:
            raise ShapeError("blockdrop_policy is already finalized")
        self.sites += 1
        return self.sites - 1

    def finalize(self) -> None:
        """Build the network once the number of gates (sites) is known."""
        d = _pooled_dim(self.read_shape)
        self.net = nn.Sequential(
            nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.sites)
        )
        nn.init.constant_(self.net[-1].bias, self.bias)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(_pool_flat(r, self.seq)))


class BlockDropParams(BlockParams):
    reads: str = "input"
    hidden: int = Field(64, gt=0)
    bias: float = 2.0


@register_block("blockdrop_policy", BlockDropParams, role="gate_policy")
def blockdrop_policy(p: BlockDropParams, shapes: list[Shape]) -> nn.Module:
    """BlockDrop: one policy net reads `reads` (default the model input) and decides every gate."""
    return BlockDropPolicy(p.reads, shapes[0], p.hidden, p.bias)


class TokenRouter(nn.Module):
    """Mixture-of-Depths router: a probability per token, sigmoid(MLP(x_t)), [B, L]."""

    style = "token"

    def __init__(self, dim: int, hidden: int, bias: float):
        super().__init__()
        self.dim = dim
        self.net = _score_mlp(dim, hidden, bias)

    def add_site(self, in_shape: Shape) -> nn.Module:
        if len(in_shape) != 2 or in_shape[-1] != self.dim:
            raise ShapeError(
                f"token_router was built for tokens of dim={self.dim}, its input here is "
                f"{list(in_shape)}"
            )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).squeeze(-1)


class TokenRouterParams(BlockParams):
    dim: int | None = Field(None, gt=0)
    hidden: int = Field(0, ge=0)
    bias: float = 0.0


@register_block("token_router", TokenRouterParams, role="gate_policy")
def token_router(p: TokenRouterParams, shapes: list[Shape]) -> nn.Module:
    """Mixture-of-Depths router of a `per: token` gate: each token's probability of running
    the body (`hidden` 0: one linear layer, as in the paper)."""
    if len(shapes[0]) != 2:
        raise ShapeError(f"token_router reads a sequence [L, D], got {list(shapes[0])}")
    d = shapes[0][-1]
    if p.dim is not None and p.dim != d:
        raise ShapeError(
            f"token_router has dim={p.dim}, but its input here has shape {list(shapes[0])}"
        )
    return TokenRouter(d, p.hidden, p.bias)


# ----------------------------------------------------------------------------- routers


class GammaDist(BaseModel):
    """A distribution of the preference value gamma during training."""

    model_config = SPEC_CONFIG
    uniform: tuple[float, float] | None = Field(None, strict=False)  # YAML gives a list
    constant: float | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.uniform is not None:
            a, b = self.uniform
            return a + (b - a) * torch.rand(n, generator=generator)
        return torch.full((n,), float(self.constant if self.constant is not None else 0.0))

    @property
    def high(self) -> float:
        """The largest gamma training sees (a test-time gamma above it is extrapolation)."""
        return float(self.uniform[1] if self.uniform is not None else self.constant or 0.0)


class GammaSpec(BaseModel):
    model_config = SPEC_CONFIG
    train: GammaDist = GammaDist(constant=0.0)
    test: float = 0.0


class Preference(BaseModel):
    """A policy preference of Composer: a cost of the chosen module, weighed by gamma."""

    model_config = SPEC_CONFIG
    cost: Literal["params", "batch_entropy"] = "params"
    gamma: GammaSpec = GammaSpec()


class ComposerRNN(nn.Module):
    """Composer's controller: a GRU shared by the metalayers that name it; sees gamma."""

    style = "router"

    def __init__(self, hidden: int, preferences: dict[str, Preference]):
        super().__init__()
        self.seq = in_sequence_model()  # pools a sequence's tokens
        self.preferences = preferences
        self.n_pref = len(preferences)
        self.state_shape = (hidden,)
        self.cell = LinearGRU(hidden + self.n_pref, hidden)
        self.proj, self.heads = nn.ModuleList(), nn.ModuleList()

    def add_site(self, in_shape: Shape, choices: int, per_token: bool = False) -> nn.Module:
        """The controller at one more metalayer; `per_token`: it scores each token of a
        sequence [L, D] (its state then one per token, [L, hidden])."""
        hidden = self.state_shape[0]
        width = in_shape[-1] if per_token else _pooled_dim(in_shape)
        self.proj.append(nn.Linear(width, hidden))
        self.heads.append(nn.Linear(hidden, choices))
        return ComposerSite(self, len(self.proj) - 1, per_token)


class ComposerSite(nn.Module):
    """The controller as seen from one metalayer; `tokens`: a per-token metalayer's, the same
    cell run on every token (x [B, L, D], its state [B, L, hidden], gamma [B, P] shared by a
    sample's tokens)."""

    def __init__(self, ctl: ComposerRNN, site: int, tokens: bool = False):
        super().__init__()
        self.ctl, self.site, self.tokens = ctl, site, tokens

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tokens:
            z = torch.relu(self.ctl.proj[self.site](_pool_flat(x, self.ctl.seq)))
            h = self.ctl.cell(torch.cat([z, gamma], dim=1), h)
            return self.ctl.heads[self.site](h), h
        b, n, _ = x.shape
        z = torch.relu(self.ctl.proj[self.site](x))
        g = gamma[:, None, :].expand(b, n, gamma.shape[1])
        h = self.ctl.cell(torch.cat([z, g], dim=2).reshape(b * n, -1), h.reshape(b * n, -1))
        h = h.view(b, n, -1)
        return self.ctl.heads[self.site](h), h


class ComposerParams(BlockParams):
    hidden: int = Field(32, gt=0)
    preferences: dict[str, Preference] = {}


@register_block("composer_rnn", ComposerParams, role="router")
def composer_rnn(p: ComposerParams, shapes: list[Shape]) -> nn.Module:
    """Composer controller shared by metalayers; gamma of each preference is one of its inputs."""
    return ComposerRNN(p.hidden, dict(p.preferences))


# ----------------------------------------------------------------------------- halting


class HaltUnit(nn.Module):
    """prob = sigmoid(w . state + b)."""

    def __init__(self, dim: int, bias: float):
        super().__init__()
        self.seq = in_sequence_model()  # pools a sequence's tokens
        self.fc = nn.Linear(dim, 1)
        nn.init.constant_(self.fc.bias, bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(
            self.fc(state.mean(1) if self.seq and state.dim() == 3 else state.flatten(1))
        ).squeeze(1)


def _state_dim(shape: Shape) -> int:
    return shape[-1] if is_sequence(shape) else math.prod(shape)


class HaltUnitParams(BlockParams):
    bias: float = 1.0


class LambdaUnitParams(BlockParams):
    bias: float = -1.0


@register_block("act_unit", HaltUnitParams, role="halting_unit")
def act_unit(p: HaltUnitParams, shapes: list[Shape]) -> nn.Module:
    """ACT halting unit: h_n = sigmoid(W s_n + b), bias +1 by default (Graves)."""
    return HaltUnit(_state_dim(shapes[0]), p.bias)


@register_block("lambda_unit", LambdaUnitParams, role="halting_unit")
def lambda_unit(p: LambdaUnitParams, shapes: list[Shape]) -> nn.Module:
    """PonderNet's lambda_n = sigmoid(W s_n + b): the probability of halting at step n."""
    return HaltUnit(_state_dim(shapes[0]), p.bias)


class StopMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int, bias: float):
        super().__init__()
        mods: list[nn.Module] = []
        d = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        mods.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*mods)
        nn.init.constant_(self.net[-1].bias, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(features)).squeeze(1)


class StopMLPParams(BlockParams):
    hidden: int = Field(32, gt=0)
    layers: int = Field(2, ge=1)
    bias: float = -2.0


@register_block("stop_mlp", StopMLPParams, role="stop_policy")
def stop_mlp(p: StopMLPParams, shapes: list[Shape]) -> nn.Module:
    """L2S stop policy pi(x, x_t): an MLP on [input, state, one-hot step] -> stop probability."""
    return StopMLP(math.prod(shapes[0]), p.hidden, p.layers, p.bias)
