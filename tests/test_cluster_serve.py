"""moetier serve on Ray Serve (the two-node loopback cluster): two models routed by body.model,
one scaled from zero on its first request, a stream, and a replica killed mid-stream ending the
stream with an OpenAI-shaped error instead of hanging."""

import json
import os
import signal
import socket

import requests
import pytest

from moetier import LLM, SamplingParams
from moetier.cluster.serve import Scale, parse_scales, run
from moetier.errors import MoetierError
from tiny import FAMILY_CONFIGS, add_char_tokenizer, make_checkpoint

from procs import titled


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, family in (("a", "mixtral"), ("b", "qwen2_moe")):
        cfg = dict(FAMILY_CONFIGS[family], vocab_size=97, eos_token_id=1, bos_token_id=0)
        out[name] = make_checkpoint(tmp_path_factory.mktemp(f"serve-{name}"), family, cfg)
        add_char_tokenizer(out[name])
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(ray_cluster, folders):
    from ray import serve

    port = _free_port()
    run({m: str(p) for m, p in folders.items()}, {"dtype": "float32"}, {"a": Scale(1, 1), "b": Scale(0, 1)},
        address=None, port=port, threads=1, blocking=False, name="moetier-test")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete("moetier-test")
        serve.shutdown()


def _running(model):
    from ray import serve

    dep = serve.status().applications["moetier-test"].deployments[f"MoetierModel-{model}"]
    return dep.replica_states.get("RUNNING", 0)


def _want(folder, prompt, n):
    llm = LLM(folder, dtype="float32")
    try:
        return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    finally:
        llm.close()


def test_routes_two_models_and_scales_one_from_zero(app, folders):
    assert _running("a") == 1 and _running("b") == 0  # b: min 0, nothing loaded yet
    with requests.Session() as c:
        assert [m["id"] for m in c.get(f"{app}/v1/models", timeout=60).json()["data"]] == ["a", "b"]
        got = {}
        for m in ("a", "b"):
            r = c.post(f"{app}/v1/completions", json={"model": m, "prompt": "abcabc", "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120)
            assert r.status_code == 200, r.text
            got[m] = r.json()["choices"][0]["text"]
        assert _running("b") == 1  # the first request started (and waited for) a replica
        assert got == {m: _want(folders[m], "abcabc", 6) for m in ("a", "b")}
        assert got["a"] != got["b"]  # two different models answered
        r = c.post(f"{app}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post(f"{app}/v1/completions", json={"model": "a", "prompt": "x", "top_p": 5}, timeout=60)  # the app's
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
        # a stream gives the same text as the plain request
        with c.post(f"{app}/v1/completions", json={"model": "a", "prompt": "abcabc", "max_tokens": 6,
                                                   "temperature": 0, "ignore_eos": True, "stream": True},
                    stream=True, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [ln[6:] for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
        assert text == got["a"]


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error(app):
    [pid] = titled(b"MoetierModel-a")  # Ray titles it ray::ServeReplica:APP:MoetierModel-a
    events = []
    with requests.Session() as c:
        with c.post(f"{app}/v1/completions", json={"model": "a", "prompt": "abc", "max_tokens": 250,
                                                   "temperature": 0, "ignore_eos": True, "stream": True},
                    stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            for ln in r.iter_lines(decode_unicode=True):
                if not ln.startswith("data: "):
                    continue
                events.append(ln[6:])
                if len(events) == 2:
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_lost"
    assert len(events) < 250


def test_replica_bounds_are_checked():
    models = {"a": "x", "b": "y"}
    assert parse_scales(["0:2", "b=1:3"], models) == {"a": Scale(0, 2), "b": Scale(1, 3)}
    for bad in ("2:1", "c=1:1", "x", "0:0"):
        with pytest.raises(MoetierError):
            parse_scales([bad], models)
