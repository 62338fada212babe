"""moetier serve on Ray Serve (the two-node loopback cluster): two models routed by body.model,
one scaled from zero on its first request onto the node that holds its checkpoint, a stream, a
replica killed mid-stream ending the stream with an OpenAI-shaped error instead of hanging when
it was the only one, and resumed on the other replica with the same tokens when there is one; a
replica drained with streams in flight, whose streams move and give the same tokens."""

import json
import os
import signal
import socket
import threading
import time
from dataclasses import asdict

import requests
import pytest

from moetier import LLM, SamplingParams
from moetier.cluster.placement import Holding
from moetier.cluster.serve import Scale, node_reports, parse_scales, run
from moetier.errors import MoetierError
from tiny import FAMILY_CONFIGS, add_char_tokenizer, make_checkpoint

from procs import titled

KILLED = []  # the replicas the tests killed
LONG = 1200  # tokens of the streams that outlive a kill or a drain (model c: a few seconds)
GB = 10**9


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, family, extra in (("a", "mixtral", {}), ("b", "qwen2_moe", {}),
                                ("c", "mixtral", dict(max_position_embeddings=2048, hidden_size=128,
                                                      intermediate_size=128))):
        cfg = dict(FAMILY_CONFIGS[family], vocab_size=97, eos_token_id=1, bos_token_id=0, **extra)
        out[name] = make_checkpoint(tmp_path_factory.mktemp(f"serve-{name}"), family, cfg)
        add_char_tokenizer(out[name])
    return out


@pytest.fixture(scope="module")
def deploy(ray_cluster, folders):
    """Deploy (or redeploy) the app with replica bounds. What the nodes report is set (they share one
    disk and page cache): b only in the second node's page cache (on the head's disk, cold), a and c
    the other way round, so a and c fill the head's two CPUs first, and the one that does not fit
    goes to the second node, which keeps a CPU for b."""
    import ray

    models = {m: str(p) for m, p in folders.items()}
    reports = node_reports(models)
    head = ray_cluster.head_node.node_id
    [other] = [n for n in reports if n != head]
    reports[head]["b"] = asdict(Holding("disk", 4 * GB, 0, True))
    reports[other]["b"] = asdict(Holding("cache", 4 * GB, 4 * GB, True))
    for m in ("a", "c"):
        reports[head][m] = asdict(Holding("cache", 4 * GB, 4 * GB, True))
        reports[other][m] = asdict(Holding("disk", 4 * GB, 0, True))
    port = _free_port()

    def go(scales):
        run(models, {"dtype": "float32"}, scales, address=None, port=port, threads=1, blocking=False,
            name="moetier-test", reports=reports)

    go.url, go.other = f"http://127.0.0.1:{port}", other
    assert ray.is_initialized()
    return go


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(deploy):
    from ray import serve

    deploy({"a": Scale(1, 1), "b": Scale(0, 1), "c": Scale(2, 2)})
    try:
        yield deploy.url
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


def test_routes_two_models_and_scales_one_from_zero(app, folders, deploy):
    assert _running("a") == 1 and _running("b") == 0  # b: min 0, nothing loaded yet
    with requests.Session() as c:
        assert [m["id"] for m in c.get(f"{app}/v1/models", timeout=60).json()["data"]] == ["a", "b", "c"]
        got = {}
        for m in ("a", "b"):
            r = c.post(f"{app}/v1/completions", json={"model": m, "prompt": "abcabc", "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120)
            assert r.status_code == 200, r.text
            got[m] = r.json()["choices"][0]["text"]
        assert _running("b") == 1  # the first request started (and waited for) a replica
        # ... on the node whose page cache holds b's checkpoint, the fastest start by the policy
        cluster = c.get(f"{app}/cluster", timeout=60).json()
        assert [n["node_id"] for n in cluster["placement"]["b"]][0] == deploy.other
        assert [r["node_id"] for r in cluster["replicas"]["b"]] == [deploy.other]
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


class Reader(threading.Thread):
    """One client's stream, read in a thread: its text, chunks and usage once it ends."""

    def __init__(self, url, path, body):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, dict(body, stream=True, stream_options={"include_usage": True})
        self.events, self.error = [], None

    def run(self):
        try:
            with requests.post(f"{self.url}{self.path}", json=self.body, stream=True, timeout=120) as r:
                assert r.status_code == 200, r.text
                for ln in r.iter_lines(decode_unicode=True):
                    if ln.startswith("data: "):
                        self.events.append(ln[6:])
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def text(self):
        assert self.error is None and self.events[-1] == "[DONE]", (self.error, self.events[-3:])
        chunks = [json.loads(e) for e in self.events[:-1]]
        assert not [c for c in chunks if "error" in c], chunks[-2:]
        out = ""
        for c in chunks:
            for ch in c["choices"]:
                out += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
        ids = {c["id"] for c in chunks}
        assert len(ids) == 1  # one stream for the client, whatever replicas it went through
        return out, chunks[-1]["usage"]


def _cluster(app):
    return requests.get(f"{app}/cluster", timeout=60).json()


def _until(cond, timeout=120, what=""):
    t = time.time()
    while not cond():
        assert time.time() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


COMPLETION = ("/v1/completions", {"model": "c", "prompt": "abc", "max_tokens": LONG, "temperature": 0,
                                  "ignore_eos": True})
CHAT = ("/v1/chat/completions", {"model": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG,
                                 "temperature": 0, "ignore_eos": True})


@pytest.fixture(scope="module")
def undisturbed(app):
    """What c answers to each request without a kill or a drain (greedy: the reference)."""
    out = {}
    for path, body in (COMPLETION, CHAT):
        r = requests.post(f"{app}{path}", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out[path] = choice.get("text") if "text" in choice else choice["message"]["content"]
        assert r.json()["usage"]["completion_tokens"] == LONG
    return out


def _streams_on(app, n):
    return [s for s in _cluster(app)["streams"] if s["model"] == "c" and s["tokens"] >= 20][:n]


def test_a_replica_killed_mid_stream_is_resumed_on_the_other(app, undisturbed):
    _until(lambda: len(_cluster(app)["replicas"]["c"]) == 2, what="c's two replicas")
    moved = _cluster(app)["moved"]
    reader = Reader(app, *COMPLETION)
    reader.start()
    _until(lambda: _streams_on(app, 1), what="the stream")
    [s] = _streams_on(app, 1)
    assert s["pid"] in titled(b"MoetierModel-c")
    os.kill(s["pid"], signal.SIGKILL)
    KILLED.append(s["replica"])
    reader.join(120)
    text, usage = reader.text()
    assert text == undisturbed[COMPLETION[0]]  # the same tokens as a run without the kill
    assert usage["completion_tokens"] == LONG and usage["prompt_tokens"] == 3  # the prompt, counted once
    assert _cluster(app)["moved"]["lost"] == moved["lost"] + 1


def test_a_drained_replica_s_streams_move_with_the_same_tokens(app, deploy, undisturbed):
    from ray import serve

    # the replica killed above replaced (Serve starts another): two again, with streams on both
    # (Serve's router picks; a stream more until each replica has one)
    def two():  # Serve's view: two replicas, the killed one no longer among them
        ids = {r["replica"] for r in _cluster(app)["replicas"]["c"]}
        return len(ids) == 2 and not ids & set(KILLED)

    _until(two, what="c's two replicas")
    moved = _cluster(app)["moved"]
    readers = []
    for path, body in (COMPLETION, CHAT, COMPLETION, CHAT):
        readers.append(Reader(app, path, body))
        readers[-1].start()
        _until(lambda: len(_streams_on(app, 4)) == len(readers), what="the streams")
        if len({s["replica"] for s in _streams_on(app, 4)}) == 2:
            break
    on = [s["replica"] for s in _streams_on(app, 4)]
    assert len(set(on)) == 2, on
    # c down to one replica (a redeploy that changes only the bounds): Serve drains one of the two
    deploy({"a": Scale(1, 1), "b": Scale(0, 1), "c": Scale(1, 1)})
    for r in readers:
        r.join(120)
    for r in readers:
        text, usage = r.text()
        assert text == undisturbed[r.path]  # the same tokens as without the drain
        assert usage["completion_tokens"] == LONG
    [kept] = [r["replica"] for r in _cluster(app)["replicas"]["c"]]
    assert kept in on
    assert _cluster(app)["moved"]["drained"] == moved["drained"] + sum(1 for x in on if x != kept) > moved["drained"]
    assert serve.status().applications["moetier-test"].deployments["MoetierModel-c"].replica_states == {"RUNNING": 1}


def test_replica_bounds_are_checked():
    models = {"a": "x", "b": "y"}
    assert parse_scales(["0:2", "b=1:3"], models) == {"a": Scale(0, 2), "b": Scale(1, 3)}
    for bad in ("2:1", "c=1:1", "x", "0:0"):
        with pytest.raises(MoetierError):
            parse_scales([bad], models)
