"""A multi-node Ray cluster on one machine, with Ray's own test utility (``ray.cluster_utils.Cluster``).

Each node is a raylet of its own with its own CPU resources, the way separate machines join a
cluster with ``ray start --address=HEAD:6379``; vLLM's Ray executor places its workers on them
through a placement group, one Ray CPU per worker (shim 6, ``swaa_vllm/platforms/ray_executor.py``).
What a one-machine cluster cannot show: a real network between the nodes (vLLM's message queues and
gloo then run over loopback) and separate installs of the plugin.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator

import pytest

OBJECT_STORE_BYTES = 128 << 20  # per node; Ray's default (30% of RAM) is far more than the tests need


@contextlib.contextmanager
def ray_cluster(nodes: int, cpus_per_node: int = 1, token_auth: bool = False) -> Iterator[object]:
    """A running ``Cluster`` of ``nodes`` nodes (the head included), connected to this process; processes
    started inside the block (vLLM's engine, ``vllm serve``) join it through ``RAY_ADDRESS``.

    ``token_auth``: Ray's token authentication, as Ray documents it for a cluster on a shared network
    (``RAY_AUTH_MODE=token`` and the cluster's token in ``RAY_AUTH_TOKEN``, set for every process: the
    nodes, this one and the processes it starts); otherwise Ray 2.60's default for a local cluster (off).

    Yields the ``ray.cluster_utils.Cluster``; its ``startup_s`` attribute is the start-up time in seconds.
    """
    with pytest.MonkeyPatch.context() as mp:
        if token_auth:
            mp.setenv("RAY_AUTH_MODE", "token")
            mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # 256 bits, like `ray get-auth-token --generate`
        with _cluster(nodes, cpus_per_node) as cluster:
            mp.setenv("RAY_ADDRESS", cluster.address)
            yield cluster


@contextlib.contextmanager
def _cluster(nodes: int, cpus_per_node: int) -> Iterator[object]:
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
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def alive_node_ids() -> set[str]:
    """Ids of the cluster's live nodes (call inside :func:`ray_cluster`)."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
