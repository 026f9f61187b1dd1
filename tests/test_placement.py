"""The expert placement plan (cluster/placement.py): pure functions, no Ray.

Layouts are written out by hand: which ranks form each expert-parallel group, which node each
rank runs on, and when the plan must warn that a group spans nodes.
"""

from __future__ import annotations

import json

import pytest

from cluster.placement import PlacementError, PlacementPlan, WorkerInfo


def workers_on(nodes: list[int], *, gpus: bool = False) -> list[WorkerInfo]:
    """Workers numbered node-major: `nodes[i]` workers on node i (Ray Train's order)."""
    out = []
    for n, count in enumerate(nodes):
        for local in range(count):
            r = len(out)
            out.append(
                WorkerInfo(
                    world_rank=r,
                    local_rank=local,
                    node_rank=n,
                    node_id=f"node-{n:02d}",
                    node_ip=f"10.0.0.{n + 1}",
                    hostname=f"host{n}",
                    pid=1000 + r,
                    device=f"cuda:{local}" if gpus else "cpu",
                    gpu_ids=(str(local),) if gpus else (),
                )
            )
    return out


def test_two_nodes_of_four_ep4_keeps_each_group_on_its_node():
    plan = PlacementPlan.build(workers_on([4, 4], gpus=True), ep=4, num_experts=16)
    assert (plan.dp, plan.ep, plan.experts_per_rank) == (2, 4, 4)
    assert [g.ranks for g in plan.groups] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [g.nodes for g in plan.groups] == [(0,), (1,)]
    assert plan.warnings == ()
    # Expert 5 lives on EP rank 1 of each group: world ranks 1 and 5, one per node.
    assert plan.ranks_of_expert(5) == [1, 5]
    d = plan.to_dict()
    e5 = d["experts"][5]
    assert e5["ep_rank"] == 1 and e5["ranks"] == [1, 5]
    assert e5["nodes"] == [0, 1] and e5["ips"] == ["10.0.0.1", "10.0.0.2"]
    assert e5["devices"] == ["cuda:1", "cuda:1"]
    assert d["workers"][6]["experts"] == [8, 9, 10, 11]
    assert d["workers"][6]["gpu_ids"] == ["2"]
    json.dumps(d)  # what placement.json holds must serialize


def test_ep8_on_two_nodes_of_four_spans_nodes_and_warns_with_the_numbers():
    plan = PlacementPlan.build(workers_on([4, 4]), ep=8, num_experts=16)
    assert plan.dp == 1
    assert [g.nodes for g in plan.groups] == [(0, 1)]
    assert len(plan.warnings) == 1
    w = plan.warnings[0]
    assert "parallel.ep (8)" in w
    assert "4 on node 0, 4 on node 1" in w
    assert "ranks 0-7" in w
    assert "* this expert-parallel group spans nodes" in plan.table()
    assert plan.to_dict()["ep_groups"][0]["spans_nodes"] is True


def test_ep2_dp4_on_two_nodes():
    plan = PlacementPlan.build(workers_on([4, 4]), ep=2, num_experts=8)
    assert plan.dp == 4
    assert [g.ranks for g in plan.groups] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [g.nodes for g in plan.groups] == [(0,), (0,), (1,), (1,)]
    assert plan.warnings == ()
    # Each expert is held by one rank of every EP group: data parallel spans the nodes.
    assert plan.ranks_of_expert(0) == [0, 2, 4, 6]
    assert plan.ranks_of_expert(7) == [1, 3, 5, 7]
    assert list(plan.experts_of_rank(3)) == [4, 5, 6, 7]


def test_uneven_nodes_only_the_boundary_group_spans():
    # 3 workers on node 0, 1 on node 1: group 0 = ranks 0,1 on node 0; group 1 = ranks 2,3
    # straddles the boundary.
    plan = PlacementPlan.build(workers_on([3, 1]), ep=2, num_experts=4)
    assert [g.nodes for g in plan.groups] == [(0,), (0, 1)]
    assert [g.index for g in plan.spanning_groups()] == [1]
    (w,) = plan.warnings
    assert "1 of 2 expert-parallel groups" in w
    assert "3 on node 0, 1 on node 1" in w
    assert "group 1 (ranks 2-3) spans nodes 0-1" in w


def test_uneven_nodes_that_still_fit_do_not_warn():
    plan = PlacementPlan.build(workers_on([4, 2, 2]), ep=2, num_experts=8)
    assert [g.nodes for g in plan.groups] == [(0,), (0,), (1,), (2,)]
    assert plan.warnings == ()


def test_nodes_are_told_apart_by_node_id_not_ray_node_rank():
    # On a local mini-cluster every node has the same IP, so Ray Train's node_rank is 0 for
    # all; the plan must still see two nodes.
    ws = [
        WorkerInfo(world_rank=r, local_rank=r, node_rank=0, node_id=f"n{r // 2}", node_ip="1.2.3.4")
        for r in range(4)
    ]
    plan = PlacementPlan.build(ws, ep=2, num_experts=8)
    assert len(plan.nodes) == 2
    assert [g.nodes for g in plan.groups] == [(0,), (1,)]


def test_workers_out_of_order_are_sorted_by_rank():
    ws = list(reversed(workers_on([2, 2])))
    plan = PlacementPlan.build(ws, ep=2, num_experts=4)
    assert [w.world_rank for w in plan.workers] == [0, 1, 2, 3]
    assert [n.node_id for n in plan.nodes] == ["node-00", "node-01"]


def test_ranks_not_node_major_warn():
    ws = workers_on([2, 2])
    # Swap ranks 1 and 2 between the nodes: node 0 holds ranks 0 and 2.
    a, b = ws[1], ws[2]
    ws[1] = WorkerInfo(1, 0, 1, b.node_id, b.node_ip)
    ws[2] = WorkerInfo(2, 1, 0, a.node_id, a.node_ip)
    plan = PlacementPlan.build(ws, ep=2, num_experts=4)
    assert any("not consecutive" in w for w in plan.warnings)
    assert any("span nodes" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("nodes", "ep", "experts", "match"),
    [
        ([3], 2, 8, r"world size \(3\) must be divisible by parallel.ep \(2\)"),
        ([4], 4, 6, r"model.moe.num_experts \(6\) must be divisible by parallel.ep \(4\)"),
        ([2], 0, 8, r"parallel.ep \(0\)"),
    ],
)
def test_bad_layouts_raise_naming_the_numbers(nodes, ep, experts, match):
    with pytest.raises(PlacementError, match=match):
        PlacementPlan.build(workers_on(nodes), ep=ep, num_experts=experts)


def test_missing_rank_raises():
    ws = workers_on([3])
    with pytest.raises(PlacementError, match=r"not 0\.\.1"):
        PlacementPlan.build([ws[0], ws[2]], ep=1, num_experts=2)


def test_table_has_one_row_per_rank():
    plan = PlacementPlan.build(workers_on([2, 2], gpus=True), ep=2, num_experts=4)
    lines = plan.table().splitlines()
    assert lines[0].startswith("placement: 4 workers on 2 node(s), dp 2 x ep 2, 4 experts")
    assert len(lines) == 1 + 1 + 4
    assert lines[2].split()[:4] == ["0", "0", "10.0.0.1", "cuda:0"]
    assert lines[5].split()[-1] == "2-3"
