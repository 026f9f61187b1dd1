"""The expert placement plan: which experts each rank holds, and where each rank runs.

The mesh is `dp x ep`, row-major over world ranks (trainer/mesh.py): expert-parallel group
`d` is the `ep` consecutive ranks `d*ep .. d*ep+ep-1`, and EP rank `i` of every group holds
experts `i*E/ep .. (i+1)*E/ep - 1`. Ray Train numbers its workers node-major (all workers of
a node, then the next node), so a group of consecutive ranks stays inside one node, and its
all-to-all on the fast intra-node links, whenever the node's worker count is a multiple of
`ep`. When it is not, some groups span nodes; the plan says which, and why.

Nodes are told apart by Ray node id, not by Ray Train's `node_rank`, which keys on the IP
address and so merges nodes that share one (several raylets on a host, as in a local
mini-cluster).

Everything here is pure: built from a list of `WorkerInfo`, testable without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class PlacementError(ValueError):
    """A layout that cannot work; the message names the numbers that disagree."""


@dataclass(frozen=True)
class WorkerInfo:
    """Where one training worker runs, as its own Ray Train context reports it."""

    world_rank: int
    local_rank: int
    node_rank: int  # Ray Train's, by IP address
    node_id: str  # Ray's node id: what tells two nodes apart
    node_ip: str
    hostname: str = ""
    pid: int = 0
    device: str = "cpu"  # "cpu" or "cuda:<local index>"
    gpu_ids: tuple[str, ...] = ()  # the physical GPU ids Ray assigned to this worker


@dataclass(frozen=True)
class NodeInfo:
    index: int  # order of first appearance in world-rank order
    node_id: str
    node_ip: str
    hostname: str
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class EPGroup:
    index: int  # = the dp rank of its members
    ranks: tuple[int, ...]
    nodes: tuple[int, ...]  # node indices its ranks run on, in rank order, deduplicated

    @property
    def spans_nodes(self) -> bool:
        return len(self.nodes) > 1


def _span(ids: Sequence[int]) -> str:
    """`0-3` for a contiguous run, else `0,2,5`."""
    if not ids:
        return "-"
    if list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


@dataclass(frozen=True)
class PlacementPlan:
    """expert id -> EP rank -> world ranks holding it -> node (id, IP) -> device."""

    ep: int
    num_experts: int
    workers: tuple[WorkerInfo, ...]
    nodes: tuple[NodeInfo, ...]
    groups: tuple[EPGroup, ...]
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, workers: Sequence[WorkerInfo], *, ep: int, num_experts: int) -> PlacementPlan:
        """The plan for `workers` (any order; one per world rank) at EP degree `ep`.

        Raises:
            PlacementError: the ranks are not exactly 0..N-1, or `ep` does not divide the
                world size or the number of experts.
        """
        by_rank = sorted(workers, key=lambda w: w.world_rank)
        world = len(by_rank)
        if [w.world_rank for w in by_rank] != list(range(world)):
            raise PlacementError(
                f"worker ranks {[w.world_rank for w in by_rank]} are not 0..{world - 1}"
            )
        if ep < 1 or world % ep:
            raise PlacementError(f"world size ({world}) must be divisible by parallel.ep ({ep})")
        if num_experts % ep:
            raise PlacementError(
                f"model.moe.num_experts ({num_experts}) must be divisible by parallel.ep ({ep})"
            )

        node_index: dict[str, int] = {}
        node_ranks: dict[str, list[int]] = {}
        for w in by_rank:
            node_index.setdefault(w.node_id, len(node_index))
            node_ranks.setdefault(w.node_id, []).append(w.world_rank)
        first = {w.node_id: w for w in reversed(by_rank)}  # first worker seen on each node
        nodes = tuple(
            NodeInfo(
                index=i,
                node_id=nid,
                node_ip=first[nid].node_ip,
                hostname=first[nid].hostname,
                ranks=tuple(node_ranks[nid]),
            )
            for nid, i in node_index.items()
        )
        groups = []
        for d in range(world // ep):
            ranks = tuple(range(d * ep, (d + 1) * ep))
            on = tuple(dict.fromkeys(node_index[by_rank[r].node_id] for r in ranks))
            groups.append(EPGroup(index=d, ranks=ranks, nodes=on))
        plan = cls(
            ep=ep,
            num_experts=num_experts,
            workers=tuple(by_rank),
            nodes=nodes,
            groups=tuple(groups),
        )
        return replace(plan, warnings=tuple(plan._check()))

    @property
    def world_size(self) -> int:
        return len(self.workers)

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    def experts_of_rank(self, rank: int) -> range:
        """Global ids of the experts `rank` holds."""
        i = rank % self.ep
        return range(i * self.experts_per_rank, (i + 1) * self.experts_per_rank)

    def ranks_of_expert(self, expert: int) -> list[int]:
        """World ranks holding `expert` (one per EP group)."""
        i = expert // self.experts_per_rank
        return [d * self.ep + i for d in range(self.dp)]

    def node_of_rank(self, rank: int) -> NodeInfo:
        nid = self.workers[rank].node_id
        return next(n for n in self.nodes if n.node_id == nid)

    def spanning_groups(self) -> list[EPGroup]:
        return [g for g in self.groups if g.spans_nodes]

    def _check(self) -> list[str]:
        out = []
        for n in self.nodes:
            if list(n.ranks) != list(range(n.ranks[0], n.ranks[0] + len(n.ranks))):
                out.append(
                    f"node {n.index} ({n.node_ip}) holds ranks {_span(n.ranks)}, not consecutive "
                    "ranks: the launcher did not order workers node-major"
                )
        span = self.spanning_groups()
        if span:
            per_node = ", ".join(f"{len(n.ranks)} on node {n.index}" for n in self.nodes)
            where = "; ".join(
                f"group {g.index} (ranks {_span(g.ranks)}) spans nodes {_span(g.nodes)}"
                for g in span
            )
            out.append(
                f"{len(span)} of {len(self.groups)} expert-parallel groups span nodes, so their "
                f"all-to-all crosses the network: parallel.ep ({self.ep}) does not fit the "
                f"workers per node ({per_node}); {where}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON written as `placement.json` in run.output_dir."""
        experts = []
        for e in range(self.num_experts):
            ranks = self.ranks_of_expert(e)
            experts.append(
                {
                    "expert": e,
                    "ep_rank": e // self.experts_per_rank,
                    "ranks": ranks,
                    "nodes": [self.node_of_rank(r).index for r in ranks],
                    "node_ids": [self.workers[r].node_id for r in ranks],
                    "ips": [self.workers[r].node_ip for r in ranks],
                    "hosts": [self.workers[r].hostname for r in ranks],
                    "devices": [self.workers[r].device for r in ranks],
                }
            )
        workers = []
        for w in self.workers:
            d = asdict(w)
            d["gpu_ids"] = list(w.gpu_ids)
            d["node"] = self.node_of_rank(w.world_rank).index
            d["ep_rank"] = w.world_rank % self.ep
            d["dp_rank"] = w.world_rank // self.ep
            d["experts"] = list(self.experts_of_rank(w.world_rank))
            workers.append(d)
        return {
            "world_size": self.world_size,
            "ep": self.ep,
            "dp": self.dp,
            "num_experts": self.num_experts,
            "nodes": [{**asdict(n), "ranks": list(n.ranks)} for n in self.nodes],
            "ep_groups": [
                {
                    "group": g.index,
                    "ranks": list(g.ranks),
                    "nodes": list(g.nodes),
                    "spans_nodes": g.spans_nodes,
                }
                for g in self.groups
            ],
            "workers": workers,
            "experts": experts,
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """A compact table for the log: one row per rank."""
        head = (
            f"placement: {self.world_size} workers on {len(self.nodes)} node(s), "
            f"dp {self.dp} x ep {self.ep}, {self.num_experts} experts "
            f"({self.experts_per_rank} per rank)"
        )
        rows = [("rank", "node", "ip", "device", "ep group", "experts")]
        for w in self.workers:
            rows.append(
                (
                    str(w.world_rank),
                    str(self.node_of_rank(w.world_rank).index),
                    w.node_ip,
                    w.device + (f" (gpu {','.join(w.gpu_ids)})" if w.gpu_ids else ""),
                    f"{w.world_rank // self.ep}"
                    + (" *" if self.groups[w.world_rank // self.ep].spans_nodes else ""),
                    _span(list(self.experts_of_rank(w.world_rank))),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + [
            "  " + "  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)) for r in rows
        ]
        if self.spanning_groups():
            lines.append("  * this expert-parallel group spans nodes")
        return "\n".join(line.rstrip() for line in lines)
