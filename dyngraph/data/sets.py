"""The built-in data sets: digits, wide_digits, parity, sparse_recovery, state_tracking."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..blocks.steps import measurement_matrix

SPLITS = ("train", "val", "test")
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


class DataError(ValueError):
    """A data set cannot be loaded as asked (a missing or malformed file, an unknown name)."""


@dataclass
class Data:
    """Inputs `x` [N, ...], targets `y` ([N] class ids or [N, ...] regression targets), `meta`
    (per-sample columns such as a difficulty), and where the samples came from (`origin`)."""

    x: torch.Tensor
    y: torch.Tensor | None
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = ""
    origin: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, index: torch.Tensor | slice) -> Data:
        """The samples at `index` (a slice or an index tensor), with their labels and meta."""
        return Data(
            self.x[index],
            None if self.y is None else self.y[index],
            {k: v[index] for k, v in self.meta.items()},
            self.name,
            self.origin,
        )

    def subset(self, n: int | None) -> Data:
        """The first `n` samples (all when n is None)."""
        return self if n is None or n >= len(self) else self.take(slice(0, n))


DATASETS: dict[str, Callable[..., Data]] = {}


def _register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def _gen(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + _SPLIT_SEED[split])


def _digits_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    n = len(order)
    cut = {
        "train": order[: int(0.6 * n)],
        "val": order[int(0.6 * n) : int(0.8 * n)],
        "test": order[int(0.8 * n) :],
    }[split]
    return d.data[cut].astype(np.float32) / 16.0, d.target[cut]


@_register("digits")
def digits(split: str = "test", seed: int = 0, n: int | None = None, image: bool = False) -> Data:
    """scikit-learn's 8x8 digits (1,797 images), flattened to [64] in [0, 1] (`image`: as
    [1, 8, 8]); 60/20/20 splits."""
    x, y = _digits_split(split, seed)
    x = torch.from_numpy(x)
    x = x.view(-1, 1, 8, 8) if image else x
    return Data(x, torch.from_numpy(y).long(), name="digits").subset(n)


@_register("wide_digits")
def wide_digits(split: str = "test", seed: int = 0, n: int | None = None) -> Data:
    """Composer's Wide-MNIST from digits: 8x16, the digit in the left or right half; 20 classes
    (class = digit + 10 * side, side 0 = left). meta: `side`."""
    x, y = _digits_split(split, seed)
    g = np.random.default_rng(seed * 7919 + _SPLIT_SEED[split])
    side = g.integers(0, 2, size=len(y))
    wide = np.zeros((len(y), 8, 16), dtype=np.float32)
    img = x.reshape(-1, 8, 8)
    for i in range(len(y)):
        wide[i, :, 8 * side[i] : 8 * side[i] + 8] = img[i]
    data = Data(
        torch.from_numpy(wide),
        torch.from_numpy(y + 10 * side).long(),
        {"side": torch.from_numpy(side).long()},
        name="wide_digits",
    )
    return data.subset(n)


@_register("parity")
def parity(split: str = "test", seed: int = 0, n: int | None = None, bits: int = 8) -> Data:
    """ACT's parity: a random number (1..bits) of entries set to +-1, the rest 0; the label is
    the parity of the number of +1 entries. meta: `nonzero` (how many entries are set)."""
    n = n or 4096
    g = _gen(seed, split)
    k = torch.randint(1, bits + 1, (n,), generator=g)
    order = torch.rand(n, bits, generator=g).argsort(dim=1)
    mask = order < k[:, None]
    signs = torch.randint(0, 2, (n, bits), generator=g) * 2 - 1
    x = (signs * mask).float()
    y = ((x == 1).sum(1) % 2).long()
    return Data(x, y, {"nonzero": k}, name="parity")


@_register("sparse_recovery")
def sparse_recovery(
    split: str = "test",
    seed: int = 0,
    n: int | None = None,
    m: int = 64,
    dim: int = 128,
    p: float = 0.1,
    snr_db: float = 20.0,
    matrix_seed: int = 0,
) -> Data:
    """L2S's task: y = A x + noise, x sparse (support probability p, N(0,1) values), SNR in dB.
    The input is y [m], the target x [dim]; A is `measurement_matrix(m, dim, matrix_seed)`, the
    same matrix a `lista_layer` with `seed: matrix_seed` uses."""
    n = n or 4096
    g = _gen(seed, split)
    a = measurement_matrix(m, dim, matrix_seed)
    x = torch.randn(n, dim, generator=g) * (torch.rand(n, dim, generator=g) < p)
    clean = x @ a.t()
    power = clean.pow(2).mean(1, keepdim=True).clamp_min(1e-12)
    noise = torch.randn(n, m, generator=g) * torch.sqrt(power / 10 ** (snr_db / 10))
    return Data(clean + noise, x, name="sparse_recovery")


#: The six permutations of five states used by state_tracking.
PERMS = [
    [1, 2, 4, 3, 0],
    [1, 0, 3, 4, 2],
    [2, 0, 1, 3, 4],
    [0, 4, 3, 2, 1],
    [0, 3, 2, 1, 4],
    [0, 1, 4, 2, 3],
]


@_register("state_tracking")
def state_tracking(
    split: str = "test", seed: int = 0, n: int | None = None, steps: int = 5
) -> Data:
    """A walk of k steps (k uniform in 1..K=`steps`) over G=6 fixed permutations of M=5 states,
    from state 0. Input: the one-hot symbols, K x G values, zero after step k. Label: the final
    state. meta: `k` (the difficulty). Depth matters: harder samples need more blocks."""
    n = n or 4096
    g = _gen(seed, split)
    perms = torch.tensor(PERMS)
    k = torch.randint(1, steps + 1, (n,), generator=g)
    sym = torch.randint(0, len(PERMS), (n, steps), generator=g)
    state = torch.zeros(n, dtype=torch.long)
    onehot = torch.zeros(n, steps, len(PERMS))
    for j in range(steps):
        active = j < k
        state = torch.where(active, perms[sym[:, j], state], state)
        onehot[torch.arange(n), j, sym[:, j]] = active.float()
    return Data(onehot.flatten(1), state, {"k": k}, name="state_tracking")


def is_file_name(name: str | None) -> bool:
    """Whether a data source names a file (rather than a built-in set)."""
    return name is not None and str(name).endswith((".npz", ".pt"))


def load_file(path: str | Path, ids: bool = False, pad: int | None = None) -> Data:
    """A user's data: an .npz with arrays `x` (and `y`), or a .pt holding a dict {x, y, ...}.
    `x` is read as floats, or (`ids`: a model of token ids) as int64 ids [N, L] padded at the
    end with the spec's pad_id `pad`; an array `lengths` [N] then says where each sequence
    ends, and what lies past it is set to `pad`.

    Every other array with one entry per sample (first dimension N) becomes a meta column
    (e.g. a difficulty `k`): profiles and evaluations report accuracy and MACs by it.
    """
    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        elif p.suffix == ".pt":
            d = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(d, dict):
                raise DataError(f"{path}: expected a dict of tensors {{x, y, ...}}")
            arrays = {k: torch.as_tensor(v) for k, v in d.items()}
        else:
            raise DataError(f"{path}: expected a .npz or .pt file")
    except DataError:
        raise
    except Exception as e:  # a missing, truncated or foreign file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DataError(f"{path}: cannot read the data: {reason}") from None
    if "x" not in arrays:
        raise DataError(f"{path}: no array named 'x' (found {', '.join(arrays) or 'none'})")
    x, y = arrays.pop("x"), arrays.pop("y", None)
    if x.dim() < 1:
        raise DataError(f"{path}: 'x' must hold one row per sample")
    if ids and (x.is_floating_point() or x.dim() != 2):
        raise DataError(
            f"{path}: token ids 'x' must be integers [N, L], got {x.dtype} {list(x.shape)}"
        )
    x = x.long() if ids else x.float()
    n = x.shape[0]
    if ids and "lengths" in arrays:
        x = _padded(x, arrays.pop("lengths"), pad, path)
    if y is not None:
        if y.shape[:1] != (n,):
            raise DataError(f"{path}: 'y' has {y.shape[0] if y.dim() else 0} rows, 'x' has {n}")
        y = y if torch.is_floating_point(y) else y.long()
    meta = {k: v for k, v in arrays.items() if v.dim() >= 1 and v.shape[0] == n}
    return Data(x, y, meta, name=p.name)


def _padded(x: torch.Tensor, lengths: torch.Tensor, pad: int | None, path) -> torch.Tensor:
    """Token ids with every position past its row's length set to `pad`."""
    if pad is None:
        raise DataError(f"{path}: 'lengths' needs the input's pad_id in the spec")
    if lengths.shape != (x.shape[0],) or lengths.is_floating_point():
        raise DataError(f"{path}: 'lengths' must hold one integer per row of 'x'")
    if bool(((lengths < 1) | (lengths > x.shape[1])).any()):
        raise DataError(f"{path}: 'lengths' must lie in [1, {x.shape[1]}]")
    x = x.clone()
    x[torch.arange(x.shape[1])[None, :] >= lengths[:, None]] = pad
    return x


def load_data(
    name: str,
    split: str = "test",
    seed: int = 0,
    n: int | None = None,
    ids: bool = False,
    pad: int | None = None,
    **params,
) -> Data:
    """A built-in data set by name (see DATASETS), or a .npz/.pt file (`ids`: of token ids,
    padded with `pad`)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if is_file_name(name):
        return load_file(name, ids, pad).subset(n)
    if name not in DATASETS:
        from ..core.errors import did_you_mean

        raise DataError(
            f"unknown data set '{name}'{did_you_mean(name, DATASETS)}; built in: {', '.join(DATASETS)}"
        )
    return DATASETS[name](split=split, seed=seed, n=n, **params)


def nmse_db(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Normalized MSE in dB: 10 log10(sum ||pred - target||^2 / sum ||target||^2)."""
    err = (pred - target).pow(2).flatten(1).sum(1).sum()
    ref = target.pow(2).flatten(1).sum(1).sum().clamp_min(1e-12)
    return 10 * math.log10(float(err / ref))
