"""Streams as OpenAI and vLLM send them, through a live ``moetier serve`` and the ``openai`` client:
tool calls whose arguments arrive piece by piece as they are generated, ``parallel_tool_calls``,
``echo`` with ``max_tokens: 0`` (the prompt alone) and streamed ``echo`` with the prompt's logprobs."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_serve_api import HI, PROMPT, WEATHER

from moetier import LLM, SamplingParams
from moetier.serve.tools import CallStream, ToolPlan, message, plan

NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


def _collect(deltas) -> tuple[str, dict[int, dict]]:
    """Content and calls put together from streamed deltas as a client does (first delta: id and name)."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            if tc.get("id"):
                assert tc["index"] not in calls, "a call's header comes once"
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": "", "pieces": 0}
            c = calls[tc["index"]]  # a piece before its header would fail here
            if tc["function"].get("arguments"):
                c["arguments"] += tc["function"]["arguments"]
                c["pieces"] += 1
    return content, calls


def _stream(client, **kw):
    chunks = list(client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER], max_tokens=100,
                                                 temperature=0, stream=True, **kw))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    return chunks, _collect(deltas)


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_tool_call_arguments_stream_as_generated(client, choice):
    body = client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER], tool_choice=choice,
                                          max_tokens=100, temperature=0)
    chunks, (content, calls) = _stream(client, tool_choice=choice)
    assert content == "" and len(calls) == 1
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert call["pieces"] > 3  # the arguments came token by token, not in one piece at the end
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    assert call["arguments"] == body.choices[0].message.tool_calls[0].function.arguments  # greedy: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the first argument piece comes before the last token: the stream did not wait for the end
    firsts = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.tool_calls
              and c.choices[0].delta.tool_calls[0].function.arguments]
    assert firsts[0] < len(chunks) - 5


def test_parallel_tool_calls(client):
    for parallel in (True, False):
        r = client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER], tool_choice="required",
                                           max_tokens=100, temperature=1.0, seed=1, parallel_tool_calls=parallel)
        calls = r.choices[0].message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), WEATHER["function"]["parameters"])
    assert plan({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}).schema["maxItems"] == 1
    assert "maxItems" not in plan({"tools": [WEATHER], "tool_choice": "required"}).schema
    two = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {}}]'
    assert len(message(plan({"tools": [WEATHER], "tool_choice": "required"}), two)["tool_calls"]) == 2
    one = message(plan({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}), two)
    assert [json.loads(c["function"]["arguments"]) for c in one["tool_calls"]] == [{"city": "Oslo"}]


HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"arguments": {"city": "R\\"ome}", "unit": "celsius"}, "name": "get_weather"}\n'
          '</tool_call>')
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}, {"name": "nope"}]'


@pytest.mark.parametrize("text", [HERMES, MISTRAL, "plain text that mentions <tool", '<tool_call>{"name": "x"'])
def test_auto_calls_stream_as_the_body_parses_them(text):
    """Fed token-sized pieces, the stream gives the content and calls the finished body has."""
    tp = ToolPlan("auto", [WEATHER])
    cs = CallStream(tp)
    deltas = [d for i in range(0, len(text), 3) for d in cs.feed(text[i:i + 3])] + cs.feed("", final=True)
    content, calls = _collect(deltas)
    msg = message(tp, text)
    assert content == (msg["content"] or "")
    assert cs.called == bool(msg.get("tool_calls"))  # finish_reason "tool_calls" only for calls that parse
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    if text == HERMES:
        assert content == "Let me look." and json.loads(calls[1]["arguments"])["city"] == 'R"ome}'
        assert calls[0]["pieces"] > 3  # streamed as it came; the second's name came last: sent once known
        assert calls[1]["pieces"] == 1


def test_echo_with_max_tokens_0_is_the_prompt(client, llm):
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), use_tqdm=False)[0]
    ids = ref.prompt_token_ids
    want = [ref.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert len(c.logprobs.tokens) == len(ids)
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == PROMPT
    lps = [v for ch in chunks if ch.choices and ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert lps[0] is None and lps[1:] == pytest.approx(want, abs=1e-5)
    assert chunks[-1].usage.completion_tokens == 0
    # without echo, max_tokens 0 stays an error
    import openai

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=0)


def test_streamed_echo_carries_the_prompt_logprobs(client):
    kw = dict(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    body = client.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in client.completions.create(stream=True, **kw)]
    assert chunks[0].text == PROMPT  # the prompt first, with its own logprobs
    assert "".join(c.text for c in chunks) == body.text
    got = {k: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, k)]
           for k in ("tokens", "token_logprobs", "text_offset")}
    assert got["tokens"] == body.logprobs.tokens and got["text_offset"] == body.logprobs.text_offset
    assert got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(body.logprobs.token_logprobs[1:], abs=1e-5)
    tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
    assert tops[0] is None and all(len(t) == 2 for t in tops[1:])
