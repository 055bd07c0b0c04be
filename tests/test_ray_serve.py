"""``vllm serve --distributed-executor-backend ray`` against a two-node Ray cluster (``make sweep``).

The README's multi-node command, run as a subprocess against a cluster of two raylets on this
machine (:mod:`tests.ray_cluster`; the server joins it through ``RAY_ADDRESS``, as after
``ray start --head`` / ``ray start --address=...``), with Ray's token authentication on
(``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in every process, as Ray documents for a cluster on
a network). The bundled model is split over the two nodes by pipeline parallelism 2 (its 9 query
heads and 3 KV heads do not split over 2 tensor-parallel ranks), with a plan that has sliding and
full layers on both stages. Checked: a chat answer, a streamed completion equal to the same
completion unstreamed, vLLM's placement group with one worker on each node, each stage's worker
naming its own layers by global index in the log, and a malformed ``swaa_config`` refused at start
with the field named.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.ray_cluster import ray_cluster
from tests.server import free_port, openai_client, stop, vllm_serve, wait_for_exit, wait_until_healthy

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("SWAA_MATRIX") != "full", reason="a server on a two-node cluster: make sweep"),
]

SERVED_NAME = "smollm2-swaa-ray"
# Stage 0 holds layers 0-14, stage 1 layers 15-29: full layers and FA-decode layers on both.
SWAA_CONFIG = {"sliding_window_size": 64, "keep_first": 8, "force_fa_decode": [2, 20],
               "non_sliding_layers": [0, 15, 29]}
RAY_ARGS = ("--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray")


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(nodes=2, token_auth=True) as c:
        yield c


@pytest.fixture(scope="module")
def server(model_dir, cluster, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray_server") / "vllm.log"
    # Ray merges similar log lines of different workers (numbers ignored: the stages' "SWAA KV memory" lines)
    # in the driver's log unless told not to.
    proc = vllm_serve(model_dir, port, SWAA_CONFIG, log_path, SERVED_NAME, RAY_ARGS, env={"RAY_DEDUP_LOGS": "0"})
    base = f"http://127.0.0.1:{port}"
    try:
        startup_s = wait_until_healthy(proc, base, log_path)
        print(f"vllm serve on the two-node cluster: cluster {cluster.startup_s:.1f} s, server {startup_s:.1f} s")
        yield base, log_path
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[0])


def test_chat_answers(client):
    r = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in r.choices[0].message.content


def test_streamed_completion_equals_unstreamed(client):
    prompt = "Here is a list of colours: red, green, blue,"
    full = client.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=16)
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=16,
                                            stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 16


def test_each_stage_on_its_own_node_applies_the_plan_of_its_global_layers(server, cluster):
    import ray

    from tests.ray_cluster import alive_node_ids

    # vLLM's placement group for the two workers: one bundle (one Ray CPU) on each node.
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert len(groups) == 1, groups
    assert set(groups[0]["bundles_to_node_id"].values()) == alive_node_ids()
    assert len(groups[0]["bundles_to_node_id"]) == 2

    log = re.sub(r"\x1b\[[0-9;]*m", "", server[1].read_text())
    assert "SWAA plan for 30 layers: full attention: layers [0, 15, 29] (3)" in log
    # Each stage's worker names the layers it converts to the sink-window KV spec, by global index: the
    # sliding-decode layers of its half (not FA-decode 2 and 20, not full 0, 15, 29).
    stages = dict(re.findall(r"\(Worker_PP(\d) pid=\d+\).*SWAA KV memory: layers \[([\d, ]+)\]", log))
    sliding_decode = [i for i in range(30) if i not in (0, 2, 15, 20, 29)]
    assert {int(k): [int(x) for x in v.split(",")] for k, v in stages.items()} == {
        0: [i for i in sliding_decode if i < 15], 1: [i for i in sliding_decode if i >= 15]}, log[-3000:]


def test_malformed_swaa_config_refused_at_start(model_dir, cluster, tmp_path):
    log_path = tmp_path / "vllm.log"
    rc = wait_for_exit(vllm_serve(model_dir, free_port(), {"sliding_window_size": 64, "non_sliding_layers": [30]},
                                  log_path, SERVED_NAME, RAY_ARGS))
    log = log_path.read_text()
    assert rc != 0
    assert "invalid swaa_config: " in log and "swaa_config.non_sliding_layers" in log, log[-3000:]


def test_the_cluster_refuses_a_process_without_its_token(cluster):
    """Token authentication is really on: the server joined with the token; a process without it cannot."""
    code = "import ray; ray.init(address='auto', log_to_driver=False)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Failed to connect to Ray cluster" in proc.stderr, proc.stderr[-2000:]
