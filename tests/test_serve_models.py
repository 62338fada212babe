"""Several models behind one server: load on first request, LRU eviction within the budget,
503 when the budget is held by busy models, 429 past the request cap."""

from __future__ import annotations

import shutil
import time

import openai
import pytest
from live_server import LiveServer, open_stream

from moetier.demo import demo_path

PROMPT = "12+34="


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    copy = tmp_path_factory.mktemp("models") / "copy"
    shutil.copytree(demo_path(), copy)
    # the demo model holds ~13.5 MiB loaded: the budget fits one model, not two
    srv = LiveServer("--model", "demo", "--model", f"copy={copy}", "--host-memory", "20MiB", "--max-requests", "2")
    yield srv
    srv.stop()


def _loaded(client) -> dict[str, bool]:
    return {m.id: m.model_extra["loaded"] for m in client.models.list().data}


def _ask(client, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_models_load_on_demand_and_evict_lru(client):
    assert _loaded(client) == {"demo": False, "copy": False}
    assert _ask(client, "demo").strip() == "46"
    assert _loaded(client) == {"demo": True, "copy": False}
    assert _ask(client, "copy").strip() == "46"  # same weights, so the same answer
    assert _loaded(client) == {"demo": False, "copy": True}  # demo was evicted to make room
    assert _ask(client, "demo").strip() == "46"
    assert _loaded(client) == {"demo": True, "copy": False}


def test_busy_model_is_not_evicted_503(server, client):
    _ask(client, "demo")
    sock = open_stream(server.port, "demo", PROMPT)  # demo is busy: it cannot make room for copy
    try:
        with pytest.raises(openai.InternalServerError) as e:
            _ask(client, "copy")
        assert e.value.status_code == 503 and e.value.body["code"] == "model_busy"
        assert "demo" in e.value.body["message"]
    finally:
        sock.close()
    for _ in range(100):  # once the stream is gone the slot frees and copy can load
        try:
            assert _ask(client, "copy").strip() == "46"
            break
        except openai.InternalServerError:
            time.sleep(0.05)
    assert _loaded(client) == {"demo": False, "copy": True}


def test_request_cap_429(server, client):
    _ask(client, "demo")
    socks = [open_stream(server.port, "demo", PROMPT) for _ in range(2)]  # --max-requests 2
    try:
        with pytest.raises(openai.RateLimitError) as e:
            _ask(client, "demo")
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        assert e.value.response.headers["Retry-After"] == "1"
    finally:
        for s in socks:
            s.close()
