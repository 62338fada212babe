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
