"""Ray as the tests run it: the settings every Ray process the tests start inherits, and the
two-node mini-cluster that the launcher and fault tests share.

Starting a Ray cluster costs seconds of CPU (a GCS, two raylets and their agents) on a
2-core machine, so the modules that need nothing but a head and one worker node of two
CPUs each share one, started the first time a test asks for it (`ray_mini_cluster`). A test
may remove nodes and add others; `two_nodes()` puts the cluster back into shape for the
next module. Tests that need a cluster of another kind (a head with its job server and
node credentials, the soak's own) start their own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Read from the environment by Ray's own processes; set by tests/conftest.py before anything
# imports ray, and passed on to the heads that tests start with an environment of their own.
# - The Ray Train controller polls its worker group every 0.5 s instead of 2 s: a finished
#   or failed group is noticed sooner (seconds at the end of every job, and per restart).
# - A node stopped with SIGTERM stops at once instead of draining for up to 30 s (nothing
#   runs on a test cluster when it is stopped).
RAY_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}

# The GCS checks each raylet every second and declares its node dead after 3 failed checks,
# instead of every 3 s and 5: a node the fault tests remove (its raylet killed) is known
# dead within seconds, and the restarted worker group no longer waits on it. A failed check
# is still one without an answer within Ray's 10 s timeout, so a busy node is not declared
# dead for being slow.
LOST_NODE_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}


class MiniCluster:
    """A `ray.cluster_utils.Cluster` of a head and worker nodes, in a temporary folder of its
    own (short: Ray's socket paths are limited to 107 bytes), so that it neither meets nor
    becomes the "current" cluster of another Ray on this machine."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="moeyard-rc-")
        self.node = {**NODE, "temp_dir": self.temp}
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **self.node,
                "include_dashboard": False,
                "_system_config": LOST_NODE_SYSTEM_CONFIG,
            },
        )

    def two_nodes(self) -> Any:
        """The head and exactly one live worker node of 2 CPUs: extra nodes are removed, a
        missing one is added, and the GCS is waited for until it counts the same. Returns
        the `Cluster`."""
        c = self.cluster
        workers = list(c.worker_nodes)
        for extra in workers[1:]:
            c.remove_node(extra)
        if not workers:
            c.add_node(**self.node)
        c.wait_for_nodes()
        return c

    def add_node(self) -> Any:
        """Another worker node like the first (a replacement machine)."""
        return self.cluster.add_node(**self.node)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_mini_cluster() -> Iterator[MiniCluster]:
    """The session's mini-cluster, started at the first test that asks for it."""
    mini = MiniCluster()
    try:
        yield mini
    finally:
        mini.shutdown()
