"""OpenAI Batch API files: parsing, results, malformed lines, resuming after a crash, the CLI."""

import json

import pytest

from moetier import LLM, SamplingParams
from moetier.batch_file import BadRequest, completed, parse_line, run_batch
from moetier.cli import main
from tiny import FAMILY_CONFIGS, add_char_tokenizer, fixed_machine_profile, make_checkpoint

PROFILE = fixed_machine_profile()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = dict(FAMILY_CONFIGS["mixtral"], vocab_size=97, eos_token_id=1, bos_token_id=0)
    folder = make_checkpoint(tmp_path_factory.mktemp("batch"), "mixtral", cfg)
    add_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def llm(folder):
    llm = LLM(folder, dtype="float32")
    llm.machine_profile = PROFILE
    return llm


def _line(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **body}})


def _requests(n=10):
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(_line(f"chat-{i}", "/v1/chat/completions", messages=[{"role": "user", "content": "hi " * i}],
                               max_tokens=4 + i % 3, temperature=0.8, seed=i, n=1 + i % 3 // 2))
        else:
            lines.append(_line(f"cmpl-{i}", prompt="abc" * (1 + i), max_tokens=5, temperature=0, stop=["zz"]))
    return lines


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _answers(entries):
    """custom_id -> the texts of its choices (what must not depend on crashes and resumes)."""
    out = {}
    for e in entries:
        if e["response"] is not None:
            body = e["response"]["body"]
            out[e["custom_id"]] = [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]
    return out


# -- parsing ---------------------------------------------------------------------------------------------------


def test_parse_maps_openai_fields():
    r = parse_line(_line("a", prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="x", n=2), 1)
    p = r.params
    assert (r.kind, p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.n) == ("completion", 7, 0.5, 0.9, 3, ["x"], 2)
    assert parse_line(_line("b", prompt="hi"), 1).params.max_tokens == 16  # the completions API default
    r = parse_line(_line("c", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                         max_completion_tokens=3, logprobs=True, top_logprobs=2), 1)
    assert (r.kind, r.params.max_tokens, r.params.logprobs, r.params.temperature) == ("chat", 3, 2, 1.0)


@pytest.mark.parametrize("text, code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_request"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), "missing_custom_id"),
    (_line("a", "/v1/embeddings", input="x"), "invalid_url"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}), "invalid_method"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}), "invalid_body"),
    (_line("a", prompt="x", temperature="hot"), "invalid_body"),
    (_line("a", prompt="x", max_tokens=0), "invalid_body"),
    (_line("a", prompt="x", max_tokens=0, echo=True), "invalid_body"),  # not silently ignored
    (_line("a", prompt=""), "invalid_body"),
    (_line("a", prompt=[[]]), "invalid_body"),
    (_line("a", prompt=["x", 5]), "invalid_body"),
    (_line("a", prompt="x", frequency_penalty=2.5), "invalid_body"),
    (_line("a", prompt="x", n=1000), "invalid_body"),
    (_line("a", prompt="x", logprobs=500), "invalid_body"),
    (_line("a", prompt="x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
     "invalid_body"),
    (_line("a", "/v1/chat/completions", messages=[]), "invalid_body"),
    (_line("a", "/v1/chat/completions", messages=[{"content": "no role"}]), "invalid_body"),
])
def test_malformed_lines_are_reported(text, code):
    with pytest.raises(BadRequest) as e:
        parse_line(text, 3)
    assert e.value.code == code and "line 3" in e.value.message


# -- running ---------------------------------------------------------------------------------------------------


def test_results_match_generate_and_errors_do_not_stop_the_job(llm, tmp_path):
    lines = _requests(6)
    bad = ["{oops", _line("bad-url", "/v1/images"), _line("bad-body", prompt="x", top_p=5),
           _line("too-long", prompt="x" * 400), _line("cmpl-0", prompt="duplicate id")]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines[:3] + bad + lines[3:]) + "\n\n")
    out = tmp_path / "out.jsonl"
    summary = run_batch(llm, inp, out, use_tqdm=False)
    entries = _read(out)
    assert summary["written"] == len(entries) == 6 + len(bad)
    errors = {e["custom_id"] or f"line {e['line']}": e["error"]["code"] for e in entries if e["error"]}
    assert errors == {"line 4": "invalid_json", "bad-url": "invalid_url", "bad-body": "invalid_body",
                      "too-long": "invalid_prompt", "line 8": "duplicate_custom_id"}
    ok = [e for e in entries if e["error"] is None]
    assert sorted(e["custom_id"] for e in ok) == sorted(json.loads(x)["custom_id"] for x in lines)
    for e in ok:
        assert e["response"]["status_code"] == 200 and e["id"].startswith("batch_req_")
        body = e["response"]["body"]
        assert body["object"] == ("chat.completion" if e["custom_id"].startswith("chat") else "text_completion")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    # the same answers as generate(): completions prompt as text, chat through the template
    cmpl = {json.loads(x)["custom_id"]: json.loads(x)["body"] for x in lines if "cmpl" in x}
    for cid, body in cmpl.items():
        want = llm.generate([body["prompt"]], SamplingParams(max_tokens=5, temperature=0, stop=["zz"]),
                            mode="latency", use_tqdm=False)[0].outputs[0].text
        assert _answers(ok)[cid] == [want]
    chat = json.loads(lines[1])["body"]
    want = llm.chat(chat["messages"], SamplingParams(max_tokens=chat["max_tokens"], temperature=0.8, seed=1),
                    use_tqdm=False)[0].outputs[0].text
    assert _answers(ok)["chat-1"] == [want]


def test_resume_after_a_crash_answers_each_request_once(llm, tmp_path):
    lines = _requests(12) + ["not json"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    clean = tmp_path / "clean.jsonl"
    run_batch(llm, inp, clean, use_tqdm=False)
    want = _answers(_read(clean))
    assert len(want) == 12

    out = tmp_path / "out.jsonl"
    written = []

    def crash_after_5(entry):
        written.append(entry)
        if len(written) == 5:
            raise KeyboardInterrupt  # the job is killed after 5 results
    with pytest.raises(KeyboardInterrupt):
        run_batch(llm, inp, out, use_tqdm=False, on_result=crash_after_5)
    assert len(_read(out)) == 5
    # ... and died while writing the sixth line
    with open(out, "a") as f:
        f.write(_line("chat-11")[:25])
    ids, _ = completed(out)
    assert len(ids) <= 5 and out.read_text().endswith("\n")  # the partial line is gone

    summary = run_batch(llm, inp, out, use_tqdm=False)
    assert summary["already_done"] == 5
    entries = _read(out)
    keys = [e["custom_id"] or f"line {e['line']}" for e in entries]
    assert len(keys) == len(set(keys)) == 13  # every request and the bad line exactly once
    assert _answers(entries) == want
    # a third run has nothing left to do
    assert run_batch(llm, inp, out, use_tqdm=False)["written"] == 0
    assert len(_read(out)) == 13


def test_cli_batch_explain_and_run(folder, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(x.replace('"tiny"', json.dumps(str(folder))) for x in _requests(4)) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["batch", "--model", str(folder), "--dtype", "float32", "--input", str(inp), "--output", str(out), "--quiet"]
    assert main(args + ["--explain"]) == 0
    assert "sequences per pass" in capsys.readouterr().out and not out.exists()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 4 and len(_read(out)) == 4
    assert main(["batch", "--model", str(folder), "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 1


def test_duplicates_survive_resume_retry_errors_and_model_check(llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [_line("a", prompt=["abc", "abd"], max_tokens=3, temperature=0),  # a list prompt: two choices
             _line("a", prompt="abc", max_tokens=3),  # a duplicate id
             _line("b", prompt="abc", max_tokens=3, model="other")]
    inp.write_text("\n".join(lines) + "\n")
    # the first run stops right after the first result, before the duplicate's error is written
    with pytest.raises(RuntimeError):
        run_batch(llm, inp, out, model="tiny", use_tqdm=False,
                  on_result=lambda e: (_ for _ in ()).throw(RuntimeError("crash")) if e["response"] else None)
    run_batch(llm, inp, out, model="tiny", use_tqdm=False)
    entries = _read(out)
    codes = sorted(e["error"]["code"] for e in entries if e["error"])
    assert codes == ["duplicate_custom_id", "model_not_found"]
    ok = [e for e in entries if e["response"]]
    assert len(ok) == 1 and [c["index"] for c in ok[0]["response"]["body"]["choices"]] == [0, 1]
    # errors are final unless asked: --retry-errors runs b again (fixed in the input) and nothing else
    inp.write_text("\n".join(lines[:2] + [_line("b", prompt="abc", max_tokens=3)]) + "\n")
    assert run_batch(llm, inp, out, model="tiny", use_tqdm=False)["to_run"] == 0
    summary = run_batch(llm, inp, out, model="tiny", use_tqdm=False, retry_errors=True)
    assert summary["to_run"] == 1
    entries = _read(out)
    assert sorted(e["custom_id"] or "dup" for e in entries) == ["a", "b", "dup"]
    assert [e["error"]["code"] for e in entries if e["error"]] == ["duplicate_custom_id"]


def test_structured_outputs_in_a_batch_validate(tmp_path):
    """response_format and structured_outputs lines, run in throughput mode by the demo model:
    every answer obeys its constraint, sampled or greedy."""
    import re

    import jsonschema

    schema = {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
        "required": ["city", "n", "tags"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": "demo", **body}})
             for cid, url, body in [
                 ("schema-0", chat, dict(messages=hi, max_tokens=60, temperature=0, response_format=rf)),
                 ("schema-1", chat, dict(messages=hi, max_tokens=60, temperature=1.0, seed=1, response_format=rf)),
                 ("schema-2", "/v1/completions", dict(prompt="12+34=", max_tokens=60, temperature=1.0, seed=2, n=2,
                                                     structured_outputs={"json": schema})),
                 ("choice", "/v1/completions", dict(prompt="12+34=", max_tokens=10, temperature=1.0, seed=3,
                                                   structured_outputs={"choice": ["yes", "no"]})),
                 ("regex", "/v1/completions", dict(prompt="12+34=", max_tokens=12, temperature=1.0, seed=4,
                                                  structured_outputs={"regex": "[0-9]{2}-[a-z]{1,3}"})),
                 ("plain", "/v1/completions", dict(prompt="12+34=", max_tokens=6, temperature=0))]]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert main(["batch", "--model", "demo", "--input", str(inp), "--output", str(out), "--quiet"]) == 0
    got = {e["custom_id"]: e for e in _read(out)}
    assert all(e["error"] is None for e in got.values()), got
    texts = _answers(got.values())
    for cid in ("schema-0", "schema-1", "schema-2"):
        for t in texts[cid]:
            jsonschema.validate(json.loads(t), schema)
    assert len(texts["schema-2"]) == 2
    assert texts["choice"][0] in ("yes", "no")
    assert re.fullmatch("[0-9]{2}-[a-z]{1,3}", texts["regex"][0])
    assert texts["plain"][0].strip() == "46"  # the unconstrained line in the same pass is untouched
