"""Elastic continuation without a cluster: which worker counts a run may use, the grad_accum
that keeps its global batch, the config errors, and the scaling policy's rounding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import load_launch_config
from cluster.elastic import at_size, counts_for, grad_accum_at, scaling_policy
from cluster.sizing import worker_counts
from trainer.config import ConfigError, grad_accum_for, load_config

TINY = "infra/runs/tiny.yaml"


def _cfg(*overrides: str):
    return load_launch_config(TINY, ["cluster.max_failures=2", *overrides])


@pytest.mark.parametrize(
    ("n", "lo", "ep", "accum", "keep", "want"),
    [
        (8, 0, 2, 1, True, [8]),  # not elastic
        (8, 8, 2, 1, True, [8]),
        (8, 2, 2, 1, True, [8, 4, 2]),  # 6 workers: DP 3 does not divide 4 micro-batches
        (8, 2, 2, 3, True, [8, 6, 4, 2]),  # 12 micro-batches: DP 3 can keep them
        (12, 1, 2, 1, True, [12, 6, 4, 2]),  # 10 (DP 5) and 8 (DP 4) cannot keep 6
        (12, 1, 2, 1, False, [12, 10, 8, 6, 4, 2]),
        (64, 32, 8, 1, True, [64, 32]),
        (64, 32, 8, 1, False, [64, 56, 48, 40, 32]),
        (6, 4, 3, 1, True, [6]),  # 4 and 5 are not multiples of ep=3
    ],
)
def test_worker_counts(n, lo, ep, accum, keep, want) -> None:
    got = worker_counts(num_workers=n, min_workers=lo, ep=ep, grad_accum=accum, keep_batch=keep)
    assert got == want
    assert all(c % ep == 0 for c in got)


def test_grad_accum_keeps_the_global_batch() -> None:
    cfg = _cfg("cluster.num_workers=8", "cluster.min_workers=2", "train.grad_accum=3")
    mb = cfg.train.micro_batch_size
    full = mb * 3 * 8
    for n in counts_for(cfg):
        assert mb * grad_accum_at(cfg, n) * n == full
    scaled = at_size(cfg, 2)
    assert scaled.train.grad_accum == 12 and cfg.train.grad_accum == 3  # a copy
    assert at_size(cfg, 8) is cfg
    assert grad_accum_at(cfg, 6) == 4
    one = _cfg("cluster.num_workers=8", "cluster.min_workers=2")
    with pytest.raises(ValueError, match=r"6 workers is not a usable size .* \[8, 4, 2\]"):
        grad_accum_at(one, 6)


def test_shrink_keeps_grad_accum() -> None:
    cfg = _cfg("cluster.num_workers=8", "cluster.min_workers=2", "cluster.elastic_batch=shrink")
    assert counts_for(cfg) == [8, 6, 4, 2]
    assert at_size(cfg, 6).train.grad_accum == cfg.train.grad_accum


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["cluster.num_workers=4", "cluster.min_workers=3"],
            r"cluster.min_workers \(3\) allows no smaller size",
        ),
        (["cluster.num_workers=6", "cluster.min_workers=4"], r"divides the 3 micro-batches"),
        (
            ["cluster.num_workers=4", "cluster.min_workers=5"],
            r"cluster.min_workers \(5\) must be between 0",
        ),
        (["cluster.num_workers=4", "cluster.min_workers=-1"], r"cluster.min_workers \(-1\)"),
        (
            ["cluster.num_workers=4", "cluster.min_workers=2", "cluster.max_failures=0"],
            r"needs restarts: set cluster.max_failures",
        ),
        (
            ["cluster.num_workers=4", "cluster.min_workers=2", "parallel.world_size=4"],
            r"parallel.world_size \(4\) pins the size",
        ),
        (["cluster.resize_check_s=0"], r"cluster.resize_check_s \(0"),
        (["cluster.elastic_batch=grow"], r"cluster.elastic_batch"),
    ],
)
def test_config_errors_name_the_key(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def test_policy_rounds_down_to_a_usable_size(monkeypatch) -> None:
    import ray.train

    cfg = _cfg("cluster.num_workers=8", "cluster.min_workers=2")
    sc = ray.train.ScalingConfig(num_workers=(2, 8), resources_per_worker={"CPU": 1.0})
    policy = scaling_policy(cfg, sc)
    alive = [{"CPU": 64.0}]  # what ray.nodes() says is alive now
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in alive])

    def room(*cpus: float) -> int:
        nodes = {f"node{i}": {"CPU": c} for i, c in enumerate(cpus)}
        return policy._count_possible_workers(nodes)

    assert room(4, 4) == 8
    assert room(4, 3) == 4  # 7 workers fit; DP 3.5 is not a layout, DP 3 cannot keep 4
    assert room(4, 1) == 4
    assert room(2, 1) == 2
    assert room(1) == 0  # below the smallest size: Ray Train waits
    assert room(16, 16) == 8  # never more than num_workers
    # Reservations still count a node that has just died; the live nodes cap the room.
    alive[:] = [{"CPU": 4.0}, {"CPU": 4.0, "GPU": 0.0}]
    assert room(4, 4, 4) == 8
    alive[:] = [{"CPU": 4.0}]
    assert room(4, 4) == 4
    alive[:] = []
    assert room(4, 4) == 0


def test_raylet_probe_tells_a_dead_node_from_a_live_one() -> None:
    import socket

    from cluster.elastic import raylet_answers

    with socket.create_server(("127.0.0.1", 0)) as live:
        port = live.getsockname()[1]
        assert raylet_answers({"NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port})
    # The same port, now closed: connection refused, as from a node whose raylet died.
    assert not raylet_answers({"NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port})
    assert raylet_answers({})  # nothing to probe: the node table is trusted


def test_policy_says_it_waits_below_the_smallest_size(monkeypatch, capsys) -> None:
    import ray
    import ray.train
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    cfg = _cfg("cluster.num_workers=8", "cluster.min_workers=4")
    sc = ray.train.ScalingConfig(num_workers=(4, 8), resources_per_worker={"CPU": 1.0})
    policy = scaling_policy(cfg, sc)
    nodes = [{"CPU": 3.0}]
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes])
    # Ray's own parts: the autoscaling coordinator's reservations follow the node list here.
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    monkeypatch.setattr(
        policy, "_get_reserved_resources", lambda: {f"n{i}": r for i, r in enumerate(nodes)}
    )
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    said = capsys.readouterr().out
    assert "elastic: waiting for nodes: the cluster has room for 3 workers" in said
    assert "smallest usable size 4 (cluster.min_workers=4)" in said
    policy.make_decision_for_non_running_worker_group()
    assert "waiting for nodes" not in capsys.readouterr().out  # once a minute, not per poll
    nodes.append({"CPU": 3.0})
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 4


@pytest.mark.parametrize(
    ("gbs", "want"),
    [
        (64, [8, 4, 2]),  # 16 micro-batches of 4 rows: 6 ranks cannot share them evenly
        (96, [8, 6, 4, 2]),  # 24 micro-batches: 6 ranks take 4 each
    ],
)
def test_global_batch_size_holds_at_every_usable_size(gbs, want) -> None:
    cfg = _cfg("cluster.num_workers=8", "cluster.min_workers=2", f"train.global_batch_size={gbs}")
    mb = cfg.train.micro_batch_size
    assert counts_for(cfg) == want
    for n in want:
        accum = grad_accum_at(cfg, n)
        assert mb * accum * n == gbs
        assert at_size(cfg, n).train.grad_accum == accum
    # The full size too: the loop derives the same grad_accum from the same batch.
    assert grad_accum_for(cfg, 8) == gbs // (mb * 8)
    with pytest.raises(ValueError, match=r"5 workers is not a usable size"):
        grad_accum_at(cfg, 5)


def test_grad_accum_for_without_and_with_a_global_batch() -> None:
    plain = load_config(TINY, ["train.grad_accum=3"])
    assert [grad_accum_for(plain, n) for n in (1, 2, 4)] == [3, 3, 3]  # the batch grows
    fixed = load_config(TINY, ["train.global_batch_size=32"])
    assert [grad_accum_for(fixed, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    agreeing = load_config(TINY, ["train.global_batch_size=32", "train.grad_accum=4"])
    assert grad_accum_for(agreeing, 2) == 4
    with pytest.raises(ConfigError, match=r"train.grad_accum \(4\) disagrees .* 8 ranks\) = 1"):
        grad_accum_for(agreeing, 8)
    with pytest.raises(ConfigError, match=r"\(16 ranks\) = 64"):
        grad_accum_for(fixed, 16)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.global_batch_size=6"], r"multiple of train.micro_batch_size \(4\)"),
        (["train.global_batch_size=-4"], r"train.global_batch_size \(-4\) must be 0"),
        (
            ["cluster.num_workers=4", "train.global_batch_size=24"],
            r"cluster.num_workers \(4\): train.global_batch_size \(24\) must be divisible by "
            r"train.micro_batch_size \(4\) x the data-parallel size \(4 ranks\) = 16",
        ),
        (
            ["cluster.num_workers=2", "train.global_batch_size=32", "train.grad_accum=3"],
            r"train.grad_accum \(3\) disagrees with train.global_batch_size \(32\)",
        ),
        (
            ["train.global_batch_size=32", "cluster.min_workers=1", "cluster.elastic_batch=shrink"],
            r"cluster.elastic_batch=shrink .* train.global_batch_size \(32\) fixes it",
        ),
        (
            [
                "parallel.ep=1",
                "cluster.num_workers=4",
                "cluster.min_workers=3",
                "train.global_batch_size=16",
            ],
            r"allows no smaller size.*train.global_batch_size \(16\) rows split",
        ),
        (
            ["parallel.world_size=4", "cluster.num_workers=4", "train.global_batch_size=8"],
            r"train.global_batch_size \(8\) must be divisible .* \(4 ranks\) = 16",
        ),
    ],
)
def test_global_batch_size_errors_name_the_keys(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def _losses_at(rank: int, world: int, overrides: list[str]) -> tuple[list[float], int, int]:
    """trainer.loop.run on a gloo rank: the loss curve, grad_accum as resolved, tokens."""
    from trainer.loop import run

    cfg = load_config(TINY, overrides)
    summary = run(cfg, local_rank=rank)
    return summary.losses, cfg.train.grad_accum, summary.tokens


@pytest.mark.slow
def test_global_batch_size_gives_one_loss_curve_at_world_1_and_2(tmp_path) -> None:
    from tests.distributed import run_ranks

    # EP 1 so that both sizes hold every expert on every rank: only the world size differs.
    # The balance loss is the sequence-wise one: the batch-wide one measures the load over the
    # micro-batches trained at once (one per rank), which the world size changes (README,
    # "Elastic continuation").
    common = [
        "train.steps=10",
        "parallel.ep=1",
        "checkpoint.every=0",
        "model.moe.aux_loss_scope=sequence",
        "train.global_batch_size=16",
    ]
    (one,) = run_ranks(_losses_at, 1, [*common, f"run.output_dir={tmp_path / 'w1'}"])
    two = run_ranks(_losses_at, 2, [*common, f"run.output_dir={tmp_path / 'w2'}"])
    assert one[1] == 4 and two[0][1] == 2  # 16 rows: 4 micro-steps of 4 rows, or 2 x 2 ranks
    assert one[2] == two[0][2] == 10 * 16 * 64  # steps x rows x seq_len
    assert len(one[0]) == 10
    assert two[0][0] == two[1][0]
    assert one[0] == pytest.approx(two[0][0], rel=1e-4)
    # Without it the batch grows with the world (32 rows at 2 ranks), and so the curve
    # differs from its first step on; 3 steps show it.
    plain = ["train.steps=3", *common[1:-1], "train.grad_accum=4"]
    grown = run_ranks(_losses_at, 2, [*plain, f"run.output_dir={tmp_path / 'g2'}"])
    assert grown[0][2] == 3 * 32 * 64
    assert grown[0][0] != pytest.approx(one[0][:3], rel=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    num_workers=st.integers(1, 12),
    min_workers=st.integers(0, 12),
    ep=st.sampled_from([1, 2, 4]),
    micro=st.sampled_from([1, 2, 4]),
    micro_batches=st.integers(1, 48),
)
def test_every_usable_size_keeps_the_global_batch(
    num_workers, min_workers, ep, micro, micro_batches
) -> None:
    """Whatever the sizes, a run with train.global_batch_size trains on exactly that many
    rows at every size it may use, with EP dividing the size; and every size left out is
    one where that is impossible."""
    gbs = micro * micro_batches
    try:
        cfg = _cfg(
            f"cluster.num_workers={num_workers}",
            f"cluster.min_workers={min(min_workers, num_workers)}",
            f"parallel.ep={ep}",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={gbs}",
        )
    except ConfigError as e:
        assert "num_workers" in str(e) or "min_workers" in str(e), e
        return
    sizes = counts_for(cfg)
    assert sizes[0] == num_workers and sizes == sorted(sizes, reverse=True)
    for n in sizes:
        assert n % ep == 0
        assert micro * grad_accum_at(cfg, n) * n == gbs
    lo = max(cfg.cluster.min_workers, 1) if cfg.cluster.min_workers else num_workers
    for n in set(range(lo, num_workers + 1)) - set(sizes):
        assert n % ep or gbs % (micro * n)


def test_usable_sizes_follow_the_fsdp_layout() -> None:
    # world = dp_replicate x dp_shard, ep divides dp_shard: with 2 replicas and ep 2, only
    # multiples of 4; without them, every multiple of ep that keeps the batch.
    base = ["cluster.num_workers=8", "cluster.min_workers=2", "parallel.ep=2"]
    assert counts_for(_cfg(*base)) == [8, 4, 2]
    hsdp = _cfg(*base, "parallel.dp_replicate=2")
    assert counts_for(hsdp) == [8, 4]
    assert at_size(hsdp, 4).train.grad_accum == 2
    with pytest.raises(ValueError, match=r"2 workers is not a usable size .* \[8, 4\]"):
        grad_accum_at(hsdp, 2)
    gbs = _cfg(*base, "parallel.dp_replicate=2", "train.global_batch_size=64")
    assert counts_for(gbs) == [8, 4]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["cluster.num_workers=8", "parallel.dp_replicate=3"],
            r"cluster.num_workers \(8\) must be divisible by parallel.dp_replicate \(3\)",
        ),
        (
            ["cluster.num_workers=8", "cluster.min_workers=2", "parallel.dp_shard=8"],
            r"allows no smaller size: .* no worker count fits parallel.dp_replicate \(1\) x "
            r"parallel.dp_shard \(8\) with parallel.ep \(2\) dividing dp_shard",
        ),
    ],
)
def test_layout_errors_name_the_keys(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)
