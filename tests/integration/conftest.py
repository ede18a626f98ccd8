"""One Ray instance for the whole integration session: a head and two worker nodes.

The nodes carry custom resources (``node_a``, ``node_b``) so a test can pin the prefill
pool to one node and the decode pool to another; single-node tests ignore them.
"""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "object_store_memory": 200 << 20})
    # Fake GPUs (Ray only counts them) let plan placement groups be tested on a CPU host.
    cluster.add_node(num_cpus=4, num_gpus=2, resources={"node_a": 4},
                     object_store_memory=100 << 20)
    cluster.add_node(num_cpus=4, num_gpus=2, resources={"node_b": 4},
                     object_store_memory=100 << 20)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
