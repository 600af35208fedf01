"""Readable parameter names: every block is registered under its place in the spec.

A block of the node with id `stem` is `blocks.stem`; a block of a node without an id is named by
its graph position, `rep{r}` standing for the r-th repetition of a `repeat`. The body of the gate
in the fourth repetition of `graph[1]` is `blocks.graph.1.rep3.0.gate.body`, its weights
`blocks.graph.1.rep3.0.gate.body.fc1.weight`; a named module is `blocks.NAME`. The
dotted names are also what a stage's `trainable:` accepts, each prefix selecting what is below
it (`trainable: [graph.1]`).

Checkpoints written before these names (`blocks.graph_1__nodes_0__gate_body___.fc1.weight`)
still load: `legacy` maps each block's old name to its new one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from ..core.errors import format_path


def node_name(path: tuple, reps: tuple[int, ...], node_id: str | None) -> tuple[str, ...]:
    """A node's name: its id, or its spec path with the k-th `nodes` (a repeat's body) as
    `rep{reps[k]}`."""
    if node_id is not None and not reps:
        return (node_id,)
    out, k = [], 0
    for part in path:
        if part == "nodes" and k < len(reps):
            out.append(f"rep{reps[k]}")
            k += 1
        else:
            out.append(str(part))
    return tuple(out)


def leaves(tree: nn.ModuleDict, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(dotted name, block) for every block in a tree of ModuleDicts."""
    for key, m in tree.items():
        if isinstance(m, nn.ModuleDict):
            yield from leaves(m, f"{prefix}{key}.")
        else:
            yield prefix + key, m


class BlockNames:
    """Registers the blocks a builder builds in a tree of ModuleDicts, under readable names."""

    def __init__(self, tree: nn.ModuleDict):
        self.tree = tree
        self.legacy: dict[str, str] = {}  # the old flat name of each block -> its dotted name
        self._nodes: dict[str, tuple[str, ...]] = {}  # a node's id -> its name
        self._current: tuple[tuple, tuple[str, ...]] | None = None
        self._old: dict[int, str] = {}  # id(block) -> its old name, while it is registered
        self._count: dict[tuple[str, ...], int] = {}  # a name -> blocks registered under it
        self._next: dict[str, int] = {}  # an old base name -> how many "_" its next block gets

    def node(self, node_id: str, name: tuple[str, ...]) -> None:
        """Name the (unrolled) node `node_id`."""
        self._nodes[node_id] = name

    def label(self, node_id: str) -> str:
        """The dotted name of node `node_id` (its blocks' prefix)."""
        return ".".join(self._nodes.get(node_id, (node_id,)))

    def enter(self, node_id: str, path: tuple) -> None:
        """The node `node_id`, defined at `path`, is being built: its blocks go under its name."""
        self._current = (path, self._nodes[node_id])

    def add(self, module: nn.Module, path: tuple) -> str:
        """Register `module`, defined at spec `path`; return its dotted name."""
        # a name nn.Module already uses (`train`, `modules`) gets a "_"
        parts = tuple(p + "_" if hasattr(nn.ModuleDict, p) else p for p in self._parts(path))
        base, k = parts, self._count.get(parts, 0)
        if k:  # the (k+1)-th block of one spec entry (unshared steps): step, step_1, step_2
            parts = (*base[:-1], f"{base[-1]}_{k}")
        while (why := _insert(self.tree, parts, module)) is not None:
            if why == "taken":
                k += 1
                parts = (*base[:-1], f"{base[-1]}_{k}")
            else:  # a user's id or module name in the way of a position
                base, k = (parts[0] + "_", *base[1:]), 0
                parts = base
        self._count[base] = k + 1
        # the old flat name: the path's non-word characters as "_", then "_" while taken
        base = re.sub(r"\W", "_", format_path(path))
        old = base + "_" * self._next.get(base, 0)  # the k-th block of one path: k "_" more
        while old in self.legacy:
            old += "_"
        self._next[base] = len(old) - len(base) + 1
        self._old[id(module)] = old
        name = ".".join(parts)
        self.legacy[old] = name
        return name

    def remove(self, module: nn.Module) -> None:
        """Unregister `module` (a controller moves to the model's `controllers`)."""
        parts = self.legacy.pop(self._old.pop(id(module))).split(".")
        chain = [self.tree]
        for p in parts[:-1]:
            chain.append(chain[-1][p])
        for node, key in zip(reversed(chain), reversed(parts), strict=True):
            del node[key]
            if len(node):  # drop the subtrees it leaves empty, not the tree itself
                break

    def _parts(self, path: tuple) -> tuple[str, ...]:
        if path[:1] == ("modules",):  # a named module: its name
            return tuple(str(p) for p in path[1:])
        if self._current is not None:
            node_path, name = self._current
            if path[: len(node_path)] == node_path:
                return name + tuple(str(p) for p in path[len(node_path) :])
        return tuple(str(p) for p in path)


def _insert(tree: nn.ModuleDict, parts: tuple[str, ...], module: nn.Module) -> str | None:
    """Put `module` at `parts` in the tree; else say why not: "taken" (a block is there) or
    "blocked" (a block is where a subtree should be, or a subtree where the block should)."""
    node = tree
    for p in parts[:-1]:
        if p not in node:
            node[p] = nn.ModuleDict()
        node = node[p]
        if not isinstance(node, nn.ModuleDict):
            return "blocked"
    if parts[-1] in node:
        return "blocked" if isinstance(node[parts[-1]], nn.ModuleDict) else "taken"
    node[parts[-1]] = module
    return None


def rename_legacy(weights: dict, legacy: dict[str, str]) -> dict:
    """`weights` with each old flat block name (`blocks.OLD.rest`) renamed to its new one."""
    out = {}
    for k, v in weights.items():
        head, _, rest = k.partition(".")
        old, _, tail = rest.partition(".")
        out[f"blocks.{legacy[old]}.{tail}" if head == "blocks" and old in legacy else k] = v
    return out
