"""The demo cascade served (``moetier serve --cascade``) and run offline (``moetier batch --cascade``)
gives the Python Cascade's answers, each named by the model that gave it."""

import json

import pytest
from live_server import LiveServer, raw_call

from moetier import LLM, SamplingParams
from moetier.cascade import Cascade
from moetier.cli import main
from moetier.demo import task_path
from moetier.evaluate import load_task

pytestmark = pytest.mark.usefixtures("one_thread")

# held-out additions: demo-small is sure of some (answers them) and unsure of others (escalated)
PROMPTS = [it.prompt for it in load_task(task_path("addition"), limit=24)]
CHAT = [{"role": "user", "content": "What is 481+25?"}]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def reference():
    """The Python cascade's answers: (model, text) per prompt, then for the chat."""
    small, large = LLM("demo-small"), LLM("demo")
    c = Cascade([small, large], names=["demo-small", "demo"])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    outs = c.generate(PROMPTS, params, use_tqdm=False)
    chat = c.chat(CHAT, params, use_tqdm=False)[0]
    small.close()
    large.close()
    got = [(o.model, o.outputs[0].text) for o in outs]
    assert {m for m, _ in got} == {"demo-small", "demo"}  # both levels are exercised
    return got, (chat.model, chat.outputs[0].text)


@pytest.fixture(scope="module")
def server():
    srv = LiveServer("--cascade", "fast=demo-small,demo", "--threads", "1")
    yield srv
    srv.stop()


def test_served_cascade_answers_as_the_python_one(server, reference):
    want, want_chat = reference
    for prompt, (model, text) in zip(PROMPTS, want):
        status, body = raw_call(server, "POST", "/v1/completions", json.dumps(
            {"model": "fast", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
        assert status == 200, body
        assert (body["model"], body["choices"][0]["text"]) == (model, text), prompt
        assert body["moetier_cascade"]["name"] == "fast" and body["choices"][0]["logprobs"] is None
    status, body = raw_call(server, "POST", "/v1/chat/completions", json.dumps(
        {"model": "fast", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
    assert status == 200 and (body["model"], body["choices"][0]["message"]["content"]) == want_chat
    status, body = raw_call(server, "GET", "/v1/models")
    assert {m["id"] for m in body["data"]} == {"fast", "demo-small", "demo"}
    # the cascade's models are served under their own ids too
    status, body = raw_call(server, "POST", "/v1/completions", json.dumps(
        {"model": "demo-small", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
    assert status == 200 and body["model"] == "demo-small"


def test_served_cascade_rejects_tools(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, body = raw_call(server, "POST", "/v1/chat/completions", json.dumps(
        {"model": "fast", "messages": CHAT, "tools": tools}).encode())
    assert status == 400 and "no tools" in body["error"]["message"]


def test_batch_cascade_answers_as_the_python_one(reference, tmp_path, capsys):
    want, want_chat = reference
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}})
             for i, p in enumerate(PROMPTS)]
    lines.append(json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "fast", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert main(["batch", "--cascade", "demo-small,demo", "--model", "fast", "--input", str(inp), "--output",
                 str(out), "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    got = {e["custom_id"]: e["response"]["body"] for e in map(json.loads, out.read_text().splitlines())}
    assert len(got) == len(PROMPTS) + 1
    for i, (model, text) in enumerate(want):
        assert (got[f"c{i}"]["model"], got[f"c{i}"]["choices"][0]["text"]) == (model, text)
    assert (got["chat"]["model"], got["chat"]["choices"][0]["message"]["content"]) == want_chat


def test_batch_needs_a_model_or_cascade(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    assert main(["batch", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "--model (or --cascade)" in capsys.readouterr().err


def test_batch_explain_splits_the_budget(tmp_path, capsys):
    cal = tmp_path / "c.json"
    cal.write_text(json.dumps({"models": ["demo-small", "demo"], "rule": "min", "thresholds": [0.6],
                               "calibration": {"answered_share": {"demo-small": 0.7, "demo": 0.3}}}))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": "1+2=", "max_tokens": 4}}) + "\n")
    args = ["batch", "--cascade", str(cal), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--explain",
            "--offload-dir", str(tmp_path / "off"), "--quiet"]
    assert main(args + ["--device-memory", "10MiB"]) == 0
    text = capsys.readouterr().out
    assert "demo-small: " in text and "reached by 100 % of requests -> resident" in text
    assert "demo: " in text and "reached by 30 % of requests -> offloaded" in text
    assert main(args + ["--device-memory", "64MiB"]) == 0
    assert "reached by 30 % of requests -> resident" in capsys.readouterr().out
