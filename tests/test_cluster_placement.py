"""The pieces of ``moetier serve --ray`` that need no cluster: the placement policy (what a node
holds, the startup estimate, the order of the nodes and Ray's selectors for it), the stream
bookkeeping live migration rests on, and the token ids the app streams for it."""

import json
import os

import pytest

from moetier.cluster.migrate import Tokens, carried, continuation
from moetier.cluster.placement import GB, Holding, Rates, actor_options, holding, probe, rank

RATES = Rates(cache_gbps=6.0, disk_gbps=1.5, network_gbps=1.25, start_s=2.0)


def test_the_estimate_counts_each_byte_at_its_tier_s_rate():
    assert Holding("cache", 12 * GB, 12 * GB).startup_s(RATES) == pytest.approx(2 + 12 / 6)
    assert Holding("disk", 12 * GB, 0, packed=True).startup_s(RATES) == pytest.approx(2 + 12 / 1.5)
    assert Holding("disk", 12 * GB, 6 * GB).startup_s(RATES) == pytest.approx(2 + 6 / 6 + 6 / 1.5)
    assert Holding("remote").startup_s(RATES, 12 * GB) == pytest.approx(2 + 12 / 1.25)
    assert Holding("none").startup_s(RATES) == float("inf")


def test_the_node_that_holds_the_checkpoint_comes_first():
    size = 40 * GB
    reports = {"n-remote": {"m": vars(Holding("remote"))}, "n-disk": {"m": vars(Holding("disk", size, 0, True))},
               "n-cache": {"m": vars(Holding("cache", size, size, True))}, "n-none": {"m": vars(Holding("none"))},
               "n-other": {"x": vars(Holding("cache", size, size))}}
    ranked = rank(reports, "m", RATES)
    assert [n for _, n in ranked] == ["n-cache", "n-disk", "n-remote"]  # a node that cannot start it is left out
    assert ranked[0][0] == pytest.approx(2 + 40 / 6, abs=1e-3)
    assert ranked[2][0] == pytest.approx(2 + 40 / 1.25, abs=1e-3)  # a node without it reads the size others see
    opts = actor_options(ranked, nodes=5)
    assert opts == {"label_selector": {"ray.io/node-id": "in(n-cache)"},
                    "fallback_strategy": [{"label_selector": {"ray.io/node-id": "in(n-disk)"}},
                                          {"label_selector": {"ray.io/node-id": "in(n-remote)"}}]}


def test_equally_fast_nodes_share_a_selector_and_all_equal_is_serve_s_own_spread():
    ranked = [(8.0, "a"), (8.2, "b"), (30.0, "c")]
    assert actor_options(ranked, nodes=3) == {"label_selector": {"ray.io/node-id": "in(a,b)"},
                                              "fallback_strategy": [{"label_selector": {"ray.io/node-id": "in(c)"}}]}
    assert actor_options([(8.0, "a"), (8.0, "b")], nodes=2) == {}
    assert actor_options([(8.0, "a"), (8.0, "b")], nodes=3) == {"label_selector": {"ray.io/node-id": "in(a,b)"}}


def test_a_node_reports_its_page_cache_and_disk(tmp_path):
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "moetier-index.json").write_text("{}")
    f = packed / "weights-00001.bin"
    with open(f, "wb") as out:
        out.write(os.urandom(1 << 20))
        out.flush()
        os.fsync(out.fileno())
    os.read(fd := os.open(f, os.O_RDONLY), 1 << 20)
    h = holding(str(packed))
    assert h.packed and h.nbytes == 1 << 20 and h.tier == "cache" and h.cached == h.nbytes
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # its clean pages dropped: on the disk only
    os.close(fd)
    h = holding(str(packed))
    if h.cached == h.nbytes:
        pytest.skip("this filesystem keeps the file's pages (tmpfs?)")
    assert h.tier == "disk" and h.cached < h.nbytes
    assert holding(str(tmp_path / "missing")).tier == "none"  # a local path this node lacks
    assert holding("org/model").tier == "remote"  # a hub id: fetched where it runs
    assert probe({"m": str(packed)})["m"]["nbytes"] == 1 << 20


def test_rates_from_the_load_benchmark(tmp_path):
    p = tmp_path / "load.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in (
        {"what": "packed", "cache": "warm", "gbps": 9.5}, {"what": "packed", "cache": "cold", "gbps": 2.5},
        {"what": "raw_read", "cache": "cold", "gbps": 3.0})) + "\nnot json\n")
    r = Rates.measured(str(p), network_gbps=12.5)
    assert (r.cache_gbps, r.disk_gbps, r.network_gbps) == (9.5, 2.5, 12.5)


def test_which_streams_can_move():
    assert carried("completion", {"prompt": "abc", "stream": True})
    assert carried("completion", {"prompt": [[1, 2, 3]], "stream": True, "max_tokens": 5})
    assert carried("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    for body in ({"prompt": "abc"}, {"prompt": "abc", "stream": True, "n": 2}, {"prompt": ["a", "b"], "stream": True},
                 {"prompt": "abc", "stream": True, "echo": True}, {"prompt": "abc", "stream": True, "logprobs": 1},
                 {"prompt": "abc", "stream": True, "response_format": {"type": "json_object"}}):
        assert not carried("completion", body), body
    assert not carried("chat", {"messages": [], "stream": True, "tools": [{"type": "function"}]})


def test_a_continuation_re_prefills_prompt_and_generated_tokens():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10,
            "min_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    c = continuation(body, [5, 6], [7, 8, 9], 10)
    assert c == {"model": "m", "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "min_tokens": 1, "temperature": 0,
                 "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}


def _sse(obj):
    return f"data: {json.dumps(obj)}\n\n".encode()


def test_the_stream_s_tokens_are_kept_and_a_continuation_reads_as_the_same_stream():
    t = Tokens("chat", want_ids=False)
    first = {"id": "chatcmpl-1", "created": 5, "object": "chat.completion.chunk", "model": "m", "prompt_token_ids": [1, 2],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    tok = {"id": "chatcmpl-1", "created": 5, "object": "chat.completion.chunk", "model": "m",
           "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None, "token_ids": [40]}]}
    raw = _sse(first) + _sse(tok)
    out = t.feed(raw[:17]) + t.feed(raw[17:])  # events split anywhere arrive whole
    assert [json.loads(o[6:]) for o in out] == [
        {k: v for k, v in first.items() if k != "prompt_token_ids"},
        {**tok, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}]
    assert t.prompt_ids == [1, 2] and t.ids == [40]
    t.resumed = True  # what comes now is a /v1/completions stream on another replica
    out = t.feed(_sse({"id": "cmpl-9", "created": 7, "object": "text_completion", "model": "m",
                       "choices": [{"index": 0, "text": "b", "finish_reason": "length", "prompt_token_ids": [1, 2, 40],
                                    "token_ids": [41]}]})
                 + _sse({"id": "cmpl-9", "object": "text_completion", "model": "m", "choices": [],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
                 + b": keep-alive\n\n" + b"data: [DONE]\n\n")
    got = [json.loads(o[6:]) if o.startswith(b"data: {") else o for o in out]
    assert got[0] == {"id": "chatcmpl-1", "created": 5, "object": "chat.completion.chunk", "model": "m",
                      "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "length", "logprobs": None}]}
    assert got[1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert got[1]["id"] == "chatcmpl-1" and got[1]["object"] == "chat.completion.chunk"
    assert got[2:] == [b": keep-alive\n\n", b"data: [DONE]\n\n"]
    assert t.ids == [40, 41] and t.finished and t.done


def test_the_app_streams_token_ids_when_asked(tmp_path):
    from fastapi.testclient import TestClient

    from moetier.serve.app import create_app
    from moetier.serve.pool import ModelPool
    from tiny import FAMILY_CONFIGS, add_char_tokenizer, make_checkpoint

    from moetier import LLM

    cfg = dict(FAMILY_CONFIGS["mixtral"], vocab_size=97, eos_token_id=1, bos_token_id=0)
    folder = make_checkpoint(tmp_path, "mixtral", cfg)
    add_char_tokenizer(folder)
    pool = ModelPool({"m": str(folder)}, lambda _n, p, mem: LLM(p, dtype="float32"), None)
    with TestClient(create_app(pool)) as c:
        body = {"model": "m", "prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        plain = c.post("/v1/completions", json=dict(body, return_token_ids=True)).json()["choices"][0]
        assert plain["prompt_token_ids"] == [ord(ch) - 30 for ch in "abc"] and len(plain["token_ids"]) == 6
        with c.stream("POST", "/v1/completions", json=dict(body, stream=True, return_token_ids=True)) as r:
            events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
        assert events[0]["choices"][0]["prompt_token_ids"] == plain["prompt_token_ids"]
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == plain["token_ids"]
        with c.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 4, "stream": True, "return_token_ids": True,
                                                             "temperature": 0, "ignore_eos": True}) as r:
            events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
        assert events[0]["prompt_token_ids"] and len([t for e in events[1:] for t in e["choices"][0]["token_ids"]]) == 4
        # without it, nothing changes
        with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
            assert "token_ids" not in r.read().decode()
