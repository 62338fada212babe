"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second OpenMP thread only adds spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server():
    """A ``moetier serve --model demo`` process of the module's own (tests/live_server.py)."""
    from live_server import LiveServer

    srv = LiveServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    """The ``openai`` client on :func:`server`."""
    from live_server import openai_client

    return openai_client(server)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of two nodes for every Ray test, on loopback only (127.0.0.1), small:
    2 logical CPUs and 100 MiB of object store per node. This process is connected to it."""
    import os

    # without this Ray swaps 127.0.0.1 for the machine's interface address; the nodes inherit it
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=2, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
