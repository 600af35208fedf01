"""Generated sequence data sets: token ids [N, L] padded at the end with id 0.

- `state_sequence`: state tracking as a sequence classification of varying difficulty: the
  symbols of a walk of k steps (k uniform in 1..L) as ids, the label the final state.
- `state_tokens`: the same walks with a label at every position: the state after it.
- `addition`: Graves' ACT addition, with numbers as ids: a label at every position, the sum of
  the numbers so far.

Labels of padded positions are `IGNORE` (-100). meta: `k`, the length (the difficulty).
"""

from __future__ import annotations

import torch

from .sets import PERMS, Data, _gen, _register

IGNORE = -100  # (tasks.IGNORE: the data layer does not import the model's tasks)


def _walks(n: int, steps: int, g: torch.Generator, noop: bool = False, full: bool = False):
    """Ids [n, steps] (symbol + 1; after step k, 0 = padding, or with `noop` the id 7 = a step
    that changes nothing), the state after each step [n, steps] and k (`full`: k = steps)."""
    perms = torch.tensor(PERMS)
    k = torch.randint(1, steps + 1, (n,), generator=g)
    if full:
        k = torch.full_like(k, steps)
    sym = torch.randint(0, len(PERMS), (n, steps), generator=g)
    active = torch.arange(steps)[None, :] < k[:, None]
    state = torch.zeros(n, dtype=torch.long)
    states = torch.full((n, steps), IGNORE, dtype=torch.long)
    for j in range(steps):
        state = torch.where(active[:, j], perms[sym[:, j], state], state)
        states[:, j] = torch.where(active[:, j], state, states[:, j])
    ids = (sym + 1) * active
    if noop:
        ids[~active] = len(PERMS) + 1
    return ids, states, k


@_register("state_sequence")
def state_sequence(
    split: str = "test", seed: int = 0, n: int | None = None, steps: int = 6, noop: bool = False
) -> Data:
    """A walk of k steps (k uniform in 1..`steps`) over 6 fixed permutations of 5 states, from
    state 0, as token ids [steps] (symbol + 1; 0 pads after step k, or with `noop` id 7 fills
    the sequence: every sequence has the full length, vocab 8); the label is the final state
    (5 classes). meta: `k`. Longer walks need more layers: a task of varying difficulty
    (without `noop`, the difficulty is the sequence's length, and so is its cost)."""
    n = n or 4096
    ids, states, k = _walks(n, steps, _gen(seed, split), noop)
    final = states.gather(1, (k - 1)[:, None]).squeeze(1)
    return Data(ids, final, {"k": k}, name="state_sequence")


@_register("state_tokens")
def state_tokens(
    split: str = "test", seed: int = 0, n: int | None = None, steps: int = 6, full: bool = False
) -> Data:
    """The walks of `state_sequence` with a label at every position: the state after that
    step (padding: -100); `full`: every walk takes all `steps` steps (no padding; a
    position's difficulty is its number of steps). meta: `k`."""
    n = n or 4096
    ids, states, k = _walks(n, steps, _gen(seed, split), full=full)
    return Data(ids, states, {"k": k}, name="state_tokens")


@_register("addition")
def addition(
    split: str = "test",
    seed: int = 0,
    n: int | None = None,
    steps: int = 5,
    digits: int = 1,
    target: str = "sum",
) -> Data:
    """Graves' ACT addition with each number as one id: k numbers (k uniform in 1..`steps`) of
    up to `digits` decimal digits (id = number + 1; 0 pads); the label at each position is the
    sum so far (classes: steps x (10^digits - 1) + 1), or with `target: next` the next id (a
    language model's labels). meta: `k`."""
    if target not in ("sum", "next"):
        raise ValueError(f"addition: target is 'sum' or 'next', not {target!r}")
    n = n or 4096
    g = _gen(seed, split)
    top = 10**digits
    k = torch.randint(1, steps + 1, (n,), generator=g)
    nums = torch.randint(0, top, (n, steps), generator=g)
    active = torch.arange(steps)[None, :] < k[:, None]
    nums = nums * active
    ids = (nums + 1) * active
    if target == "next":
        y = torch.full_like(ids, IGNORE)
        y[:, :-1] = torch.where(active[:, 1:], ids[:, 1:], IGNORE)
    else:
        y = torch.where(active, nums.cumsum(1), torch.full_like(nums, IGNORE))
    return Data(ids, y, {"k": k}, name="addition")


@_register("pointer_chase")
def pointer_chase(
    split: str = "test", seed: int = 0, n: int | None = None, size: int = 8, hops: int = 6
) -> Data:
    """Follow k pointers (k uniform in 1..`hops`): `size` tokens each holding a position
    (a random function of the positions), start at position 0, the label is the position
    reached after k hops (`size` classes). Ids: the first token is k (id size + k), then the
    pointers (id = position + 1); 0 is padding (unused: every sequence has the full length).
    meta: `k`. A transformer layer can follow one pointer: depth matters up to `hops`."""
    n = n or 4096
    g = _gen(seed, split)
    k = torch.randint(1, hops + 1, (n,), generator=g)
    ptr = torch.randint(0, size, (n, size), generator=g)
    at = torch.zeros(n, dtype=torch.long)
    for j in range(hops):
        at = torch.where(j < k, ptr.gather(1, at[:, None]).squeeze(1), at)
    ids = torch.cat([(size + k)[:, None], ptr + 1], dim=1)
    return Data(ids, at, {"k": k}, name="pointer_chase")
