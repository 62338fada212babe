"""The OpenAI surface beyond plain completions, through a live ``moetier serve`` and the ``openai`` client:
structured outputs, tools, echo with prompt logprobs, penalties, list prompts, the extra endpoints,
and every bad input answered with a 400 that names it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jsonschema
import openai
import pytest
from live_server import raw_call

from moetier import LLM, SamplingParams

PROMPT = "12+34="
SCHEMA = {  # nested, and bounded so the demo's 128-token context holds it
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "address": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 9999}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "address", "tags"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


def _err(e) -> dict:
    b = e.value.body
    return b["error"] if "error" in b else b


# -- structured outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, temperature):
    for seed in range(2):
        r = client.chat.completions.create(
            model="demo", messages=HI, max_tokens=100, temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"


def test_json_object_choice_and_regex(client):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].text in ("yes", "no", "maybe")
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3, n=3,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{1,3}"}})
    import re

    assert all(re.fullmatch("[0-9]{2}-[a-z]{1,3}", c.text) for c in r.choices), [c.text for c in r.choices]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
        extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{1,3}"}}))
    assert re.fullmatch("[0-9]{2}-[a-z]{1,3}", streamed)


def test_bad_schema_and_regex_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert _err(e)["param"] == "response_format" and "nope" in _err(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, extra_body={"structured_outputs": {"regex": "[a-"}})
    assert "regex" in _err(e)["message"]


# -- tools -------------------------------------------------------------------------------------------------


def test_named_and_required_tool_calls_parse(client):
    schema = WEATHER["function"]["parameters"]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=80, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert _err(e)["param"] == "tool_choice" and "nope" in _err(e)["message"]


def test_hermes_tool_call_syntax_is_parsed():
    from moetier.serve.tools import ToolPlan, message

    tp = ToolPlan("auto", [WEATHER])
    msg = message(tp, 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": '
                      '"celsius"}}\n</tool_call>')
    assert msg["content"] == "Let me look." and json.loads(msg["tool_calls"][0]["function"]["arguments"]) == \
        {"city": "Oslo", "unit": "celsius"}
    assert message(tp, "no call here") == {"role": "assistant", "content": "no call here"}
    msg = message(tp, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]')
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"


# -- echo, penalties, prompts ------------------------------------------------------------------------------


def test_echo_logprobs_equal_prompt_logprobs(client, llm):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), use_tqdm=False)[0]
    ids = ref.prompt_token_ids
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) + 1
    want = [ref.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-5)


def _reference_penalized(llm, prompt: str, steps: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding with vLLM's presence/frequency rule applied by hand on the full distributions
    (the penalties shift logits by constants per token, so log-probs give the same argmax)."""
    ids = llm.tokenizer.encode(prompt)
    out: list[int] = []
    for _ in range(steps):
        seq = ids + out
        logp = llm.next_token_logprobs(seq + [0], start=len(seq) - 1)[0].clone()  # the row after seq
        for t in set(out):
            logp[t] -= frequency * out.count(t) + presence
        out.append(int(logp.argmax()))
    return out


def test_penalties_match_vllms_rule(client, llm):
    plain = client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    for presence, frequency in ((1.5, 0.0), (0.0, 0.7)):
        r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0,
                                      presence_penalty=presence, frequency_penalty=frequency,
                                      extra_body={"ignore_eos": True})
        want = _reference_penalized(llm, PROMPT, 10, presence, frequency)
        assert r.choices[0].logprobs.tokens == [llm.tokenizer.decode([t]) for t in want]
        assert r.choices[0].text != plain.choices[0].text  # the crafted case: the plain output repeats itself
    # repetition_penalty and logit_bias: a banned token never appears, a penalized repeat is rarer
    banned = llm.tokenizer.encode("4")[-1]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    assert "4" not in r.choices[0].text


def test_min_tokens_blocks_eos(client, llm):
    r = llm.generate([PROMPT], SamplingParams(max_tokens=6, min_tokens=5, temperature=0), use_tqdm=False)[0]
    ids = r.outputs[0].token_ids
    assert 2 not in ids[:5] and len(ids) >= 5  # the demo's EOS is 2; without min_tokens it comes third
    s = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                  extra_body={"min_tokens": 5})
    assert s.usage.completion_tokens >= 5


def test_list_and_token_id_prompts(client, llm):
    ids = llm.tokenizer.encode("1+2=")
    r = client.completions.create(model="demo", prompt=[PROMPT, "1+2="], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text.strip() for c in r.choices] == ["46", "46", "3", "3"]
    r = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text.strip() == "3"
    r = client.completions.create(model="demo", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text.strip() for c in r.choices] == ["3", "3"]


# -- limits and bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, param, words", [
    (dict(max_tokens=100000000), "max_tokens", "context length is 128"),
    (dict(n=1000), "n", "[1, 16]"),
    (dict(logprobs=500), "logprobs", "[0, 20]"),
    (dict(extra_body={"best_of": 2}), "best_of", "best_of"),
    (dict(suffix="x"), "suffix", "does not implement"),
    (dict(extra_body={"presence_penalty": 9}), "presence_penalty", "[-2, 2]"),
    (dict(extra_body={"min_tokens": "five"}), "min_tokens", "integer"),
])
def test_completion_400s_name_the_parameter(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, **kw)
    assert _err(e)["param"] == param and words in _err(e)["message"], _err(e)


def test_context_exceeded_is_400_before_the_stream(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=100000000, stream=True)
    assert _err(e)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("kw, param", [
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=HI, logprobs=True, top_logprobs=50), "top_logprobs"),
    (dict(messages=HI, extra_body={"audio": {"voice": "x"}}), "audio"),
])
def test_chat_400s_name_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", **kw)
    assert _err(e)["param"] == param, _err(e)


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"not_a_field": 1})
    assert r.choices[0].text.strip() == "46"


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "moetier", "serve", "--model", "demo", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "already in use" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "moetier", "serve", "--model", "demo", "--host", "no.such.host.invalid"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "cannot listen" in p.stderr, p.stderr


# -- endpoints ---------------------------------------------------------------------------------------------


def test_model_tokenize_detokenize_docs(server, client, llm):
    m = client.models.retrieve("demo")
    assert m.id == "demo" and m.model_extra["max_model_len"] in (None, 128)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    body = json.dumps({"model": "demo", "prompt": PROMPT}).encode()
    status, tok = raw_call(server, "POST", "/tokenize", body)
    assert status == 200 and tok["tokens"] == llm.tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 128
    status, det = raw_call(server, "POST", "/detokenize", json.dumps({"model": "demo", "tokens": tok["tokens"]}).encode())
    assert status == 200 and det["prompt"].endswith(PROMPT)
    status, bad = raw_call(server, "POST", "/detokenize", json.dumps({"model": "demo", "tokens": [99999]}).encode())
    assert status == 400 and bad["error"]["param"] == "tokens"
    status, spec = raw_call(server, "GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(spec["paths"])


def test_unload_load_and_keep_alive(server, client):
    status, card = raw_call(server, "POST", "/v1/models/demo/unload", b"")
    assert status == 200 and card["loaded"] is False
    status, card = raw_call(server, "POST", "/v1/models/demo/load", b"")
    assert status == 200 and card["loaded"] is True
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, extra_body={"keep_alive": 0})
    import time

    deadline = time.time() + 10
    while client.models.retrieve("demo").model_extra["loaded"] and time.time() < deadline:
        time.sleep(0.2)
    assert not client.models.retrieve("demo").model_extra["loaded"]
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"keep_alive": -1}).choices[0].text.strip() == "46"
