"""A draft tree's shape, in one place: node i follows node parents[i] (-1: the context).

Parents come before their children, so one pass in node order computes anything that
flows from the root.  A chain is the tree whose parents are -1, 0, 1, ...  Pure
functions over the parents list: drafters build trees, the budget prunes them, the
verifiers walk them and the backends lay them out in a batch, all with these.
"""

from __future__ import annotations

from collections.abc import Sequence


def chain(n: int) -> list[int]:
    """Parents of a chain of n nodes."""
    return list(range(-1, n - 1))


def is_chain(parents: Sequence[int]) -> bool:
    return list(parents) == chain(len(parents))


def depths(parents: Sequence[int]) -> list[int]:
    """Each node's depth (0: a child of the context)."""
    depth: list[int] = []
    for par in parents:
        depth.append(depth[par] + 1 if par >= 0 else 0)
    return depth


def children_of(parents: Sequence[int]) -> dict[int, list[int]]:
    """Node index -> its children in draft order (-1 is the root: the last context token).
    Raises ValueError when a parent does not come before its child."""
    kids: dict[int, list[int]] = {-1: []}
    for i, par in enumerate(parents):
        if not -1 <= par < i:
            raise ValueError(f"node {i} has parent {par}: parents must precede children")
        kids.setdefault(par, []).append(i)
        kids.setdefault(i, [])
    return kids


def sequences(parents: Sequence[int]) -> list[list[int]]:
    """The sequences each node belongs to, as a batch lays a tree out: leaf j (in node
    order) is sequence j, and a node is in the sequences of all its leaves."""
    n = len(parents)
    has_child = [False] * n
    for par in parents:
        if par >= 0:
            has_child[par] = True
    seqs: list[list[int]] = [[] for _ in range(n)]
    for s, leaf in enumerate(i for i in range(n) if not has_child[i]):
        node = leaf
        while node >= 0:
            seqs[node].append(s)
            node = parents[node]
    return seqs


def subtree(parents: Sequence[int], keep: Sequence[int]) -> list[int]:
    """Parents of the nodes `keep` (sorted, closed under parents), re-indexed."""
    index = {old: new for new, old in enumerate(keep)}
    return [index[parents[i]] if parents[i] >= 0 else -1 for i in keep]


def shallower_than(parents: Sequence[int], k: int) -> list[int]:
    """The nodes less than k deep (closed under parents)."""
    return [i for i, d in enumerate(depths(parents)) if d < k]


def main_chain(parents: Sequence[int] | None, n: int) -> int:
    """Length of the chain a draft's first nodes form (all n of them for a chain: None)."""
    if parents is None:
        return n
    return next((i for i, par in enumerate(parents) if par != i - 1), len(parents))
