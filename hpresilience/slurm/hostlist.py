"""Hostlist expressions (``n[1-4,7]``), always through ClusterShell's NodeSet.

    >>> expand("n[1-3]")
    ['n1', 'n2', 'n3']
    >>> fold(["n3", "n1", "n2"])
    'n[1-3]'
"""
from __future__ import annotations

import re
from typing import Iterable, List, Union

from ClusterShell.NodeSet import NodeSet, NodeSetException

from .errors import InvalidNodeName

# Slurm node names: letters, digits, '-', '_', '.'; brackets/commas only in
# hostlist expressions. Anything else (spaces, '=', quotes) would let a name
# smuggle extra arguments into an scontrol command.
_HOSTLIST_RE = re.compile(r"[A-Za-z0-9_.\-\[\],]+")

Nodes = Union[str, Iterable[str], NodeSet]


def nodeset(nodes: Nodes) -> NodeSet:
    """A NodeSet from a hostlist expression, a list of names or a NodeSet."""
    if isinstance(nodes, NodeSet):
        return nodes
    parts = [nodes] if isinstance(nodes, str) else list(nodes)
    result = NodeSet()
    for part in parts:
        if not isinstance(part, str) or not part.strip():
            raise InvalidNodeName(str(part), "empty")
        if not _HOSTLIST_RE.fullmatch(part):
            raise InvalidNodeName(part, "only letters, digits, '-', '_', '.' and hostlist brackets are allowed")
        try:
            result.update(NodeSet(part))
        except NodeSetException as e:
            raise InvalidNodeName(part, str(e)) from e
    if not result:
        raise InvalidNodeName(str(nodes), "no nodes")
    return result


def expand(nodes: Nodes) -> List[str]:
    return list(nodeset(nodes))


def fold(nodes: Nodes) -> str:
    return str(nodeset(nodes))


def expand_or_empty(text: str) -> List[str]:
    """Like expand() for Slurm output, where "(null)" or "" mean no nodes."""
    if not text or text in ("(null)", "None"):
        return []
    return expand(text)
