"""The OpenAI-compatible server, driven by the official ``openai`` client on a live loopback port."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time

import openai
import pytest
from live_server import KEY, open_stream, openai_client, raw_call

PROMPT = "12+34="


def _long(client, **kw):
    """A greedy completion that runs to max_tokens (EOS ignored)."""
    return client.completions.create(model="demo", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True},
                                     **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=1)
    assert client.models.list().data[0].model_extra["loaded"] is True
    status, body = raw_call(server, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["requests_live"] == 0


def test_completion_and_usage(client):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() == "46"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = _long(client, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_chat(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 6


def test_stream_equals_greedy(client):
    full = _long(client, max_tokens=12).choices[0].text
    chunks = list(_long(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 12
    chat = dict(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    want = client.chat.completions.create(**chat).choices[0].message.content
    got = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **chat))
    assert got == want


def test_sse_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_and_seed(client):
    r = _long(client, max_tokens=6, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 1  # greedy: all the same
    assert r.usage.completion_tokens == 18
    kw = dict(model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=2,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_stop_string(client):
    full = _long(client, max_tokens=12).choices[0].text
    stop = full[3:5]
    assert stop and full.find(stop) >= 1
    r = _long(client, max_tokens=12, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in _long(client, max_tokens=12, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def _err(exc_info):
    return exc_info.value.body if isinstance(exc_info.value.body, dict) and "message" in exc_info.value.body \
        else exc_info.value.body["error"]


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert _err(e)["code"] == "model_not_found" and _err(e)["param"] == "model"


def test_bad_api_key_401(server):
    bad = openai_client(server, key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt=PROMPT, max_tokens=2)


def test_prompt_past_context_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="1+1=" * 100, max_tokens=2)
    msg = _err(e)["message"]
    assert "128" in msg and "tokens" in msg and _err(e)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, param", [
    ({"model": "demo"}, "prompt"),  # missing prompt
    ({"prompt": PROMPT}, "model"),  # missing model
    ({"model": "demo", "prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"model": "demo", "prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"model": "demo", "prompt": 5}, "prompt"),
    ({"model": "demo", "prompt": PROMPT, "stream": "yes"}, "stream"),
])
def test_bad_fields_400(server, body, param):
    status, obj = raw_call(server, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 400
    assert set(obj["error"]) == {"message", "type", "param", "code"} and obj["error"]["param"] == param


def test_bad_json_and_chat_shape_400(server, client):
    status, obj = raw_call(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and obj["error"]["code"] == "invalid_json"
    status, obj = raw_call(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[{"content": "no role"}])
    # and the server still serves
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_two_concurrent_streams(client):
    want = {k: _long(client, max_tokens=k).choices[0].text for k in (30, 40)}
    got, errors = {}, []

    def run(k):
        try:
            got[k] = "".join(c.choices[0].text for c in _long(client, max_tokens=k, stream=True))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want


def test_disconnect_aborts(server, client):
    before = server.health()["aborted"]
    sock = open_stream(server.port, "demo", PROMPT)
    sock.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while (h := server.health())["aborted"] == before or h["requests_live"]:
        if time.time() > deadline:
            break
        time.sleep(0.05)
    assert h["aborted"] == before + 1 and h["requests_live"] == 0, h
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_cli_parses_serve():
    from moetier.cli import build_parser

    a = build_parser().parse_args(["serve", "--model", "demo", "--port", "0", "--api-key", "k"])
    assert (a.command, a.host, a.port, a.api_key, a.model) == ("serve", "127.0.0.1", 0, "k", ["demo"])


def test_logprobs(client):
    r = _long(client, max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens).startswith(r.choices[0].text)  # the tokens also show the EOS ignored after "46"
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    streamed = [c for c in _long(client, max_tokens=6, logprobs=3, stream=True) if c.choices[0].logprobs]
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed) == 6
    assert [v for c in streamed for v in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-6)


def _metrics(server) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    text = r.read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics(server, client):
    before = _metrics(server)
    ok = 'moetier:http_requests_total{model_name="demo",code="200"}'
    bad = 'moetier:http_requests_total{model_name="demo",code="400"}'
    gen = 'moetier:generation_tokens_total{model_name="demo"}'
    ttft = 'moetier:time_to_first_token_seconds_count{model_name="demo"}'
    e2e_inf = 'moetier:e2e_request_latency_seconds_bucket{model_name="demo",le="+Inf"}'
    itl = 'moetier:inter_token_latency_seconds_count{model_name="demo"}'
    length = 'moetier:request_success_total{model_name="demo",finished_reason="length"}'
    r1 = _long(client, max_tokens=5)
    list(_long(client, max_tokens=7, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=5)
    after = _metrics(server)
    assert after[ok] - before.get(ok, 0) == 2
    assert after[bad] - before.get(bad, 0) == 1
    assert after[gen] - before.get(gen, 0) == r1.usage.completion_tokens + 7
    assert after[ttft] - before.get(ttft, 0) == 2 and after[e2e_inf] - before.get(e2e_inf, 0) == 2
    assert after[length] - before.get(length, 0) == 2
    assert after[itl] > before.get(itl, 0)  # gaps between deltas (EOS ignored past "46" sends none)
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v) for k, v in after.items()
                     if k.startswith("moetier:time_to_first_token_seconds_bucket") and "+Inf" not in k)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
    assert after['moetier:model_loaded{model_name="demo"}'] == 1 and after["moetier:requests_inflight"] == 0
    assert after['moetier:num_requests_running{model_name="demo"}'] == 0
    assert after['moetier:num_requests_waiting{model_name="demo"}'] == 0
