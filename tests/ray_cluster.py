"""A multi-node Ray cluster on one machine, with Ray's own test utility (``ray.cluster_utils.Cluster``).

Each node is a raylet of its own with its own CPU resources, the way separate machines join a
cluster with ``ray start --address=HEAD:6379``; vLLM's Ray executor places its workers on them
through a placement group, one Ray CPU per worker (shim 6, ``swaa_vllm/platforms/ray_executor.py``).
What a one-machine cluster cannot show: a real network between the nodes (vLLM's message queues and
gloo then run over loopback) and separate installs of the plugin.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

OBJECT_STORE_BYTES = 128 << 20  # per node; Ray's default (30% of RAM) is far more than the tests need


@contextlib.contextmanager
def ray_cluster(nodes: int, cpus_per_node: int = 1) -> Iterator[object]:
    """A running ``Cluster`` of ``nodes`` nodes (the head included), connected to this process; processes
    started inside the block (vLLM's engine, ``vllm serve``) join it through ``RAY_ADDRESS``.

    Yields the ``ray.cluster_utils.Cluster``; its ``startup_s`` attribute is the start-up time in seconds.
    """
    import ray
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.startup_s = time.perf_counter() - start
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_ADDRESS", cluster.address)
            yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def alive_node_ids() -> set[str]:
    """Ids of the cluster's live nodes (call inside :func:`ray_cluster`)."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
