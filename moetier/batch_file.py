"""OpenAI Batch API files, run offline in throughput mode.

Input: one request per line,
``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}``
with an OpenAI request body (``messages`` or ``prompt``, ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``n``, ``logprobs``...). Output: one line per request,
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <completion or
chat.completion object>}, "error": null}``, or ``"response": null`` and
``"error": {"code", "message"}`` for a line that cannot run (bad JSON, no custom_id, unknown
url, bad body, a prompt too long for the model).

Each result is appended and flushed as soon as its request finishes. Running again with
the same output skips every ``custom_id`` already there, so an interrupted job resumes
and loses nothing; a partly written last line (a crash mid-write) is cut off first.

A damaged checkpoint (a checksum mismatch or a short read while the run reads an expert: a
CheckpointError naming the file, layer and expert) fails every request not yet answered with a
``checkpoint_error`` line: a throughput pass reads every expert of each layer for all of its
sequences, so each of them needed the bad bytes. Those lines are not final: a later run with the
same output (once the checkpoint is repaired) removes them and runs their requests again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .errors import CheckpointError, MoetierError, RequestError
from .runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
RETRIED = ("checkpoint_error",)  # error codes of lines that a later run removes and runs again
_UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty")


class BadRequest(Exception):
    """A line that cannot run; becomes an ``error`` entry in the output."""

    def __init__(self, code: str, message: str, custom_id: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id
        self.line: Optional[int] = None


@dataclass
class BatchRequest:
    line: int  # 1-based line number in the input
    custom_id: str
    kind: str  # "chat" or "completion"
    body: dict
    params: SamplingParams


# -- reading -------------------------------------------------------------------------------------


def parse_line(text: str, line: int) -> BatchRequest:
    """One input line -> a request, or :class:`BadRequest` saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BadRequest("invalid_json", f"line {line}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadRequest("invalid_request", f"line {line}: a request must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadRequest("missing_custom_id", f"line {line}: custom_id must be a non-empty string")
    method = obj.get("method", "POST")
    if method != "POST":
        raise BadRequest("invalid_method", f"line {line}: method must be POST, got {method!r}", cid)
    url = obj.get("url")
    if url not in URLS:
        raise BadRequest("invalid_url", f"line {line}: url must be one of {', '.join(URLS)}, got {url!r}", cid)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadRequest("invalid_body", f"line {line}: body must be a JSON object", cid)
    kind = URLS[url]
    try:
        _check_prompt_shape(body, kind)
        params = sampling_params(body, kind)
    except (ValueError, TypeError) as e:
        raise BadRequest("invalid_body", f"line {line}: {e}", cid) from None
    return BatchRequest(line, cid, kind, body, params)


def _check_prompt_shape(body: dict, kind: str) -> None:
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("messages must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError("each message needs a role and content")
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        ok = (isinstance(p, str) and p) or (isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p))
        if not ok:
            raise ValueError("prompt must be a non-empty string or list of token ids (one prompt per request)")


def _number(body: dict, key: str, default, kind=(int, float)):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise ValueError(f"{key} must be a number, got {v!r}")
    return v


def sampling_params(body: dict, kind: str) -> SamplingParams:
    """The body's sampling fields as :class:`SamplingParams` (OpenAI defaults); ValueError if invalid."""
    for k in _UNSUPPORTED:
        if body.get(k) not in (None, 0, 0.0, {}):
            raise ValueError(f"{k} is not supported")
    if body.get("stream"):
        raise ValueError("stream is not available in a batch")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if kind == "chat" else \
        body.get("max_tokens", 16)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ValueError("stop must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    logprobs = None
    if kind == "chat":
        if body.get("logprobs"):
            logprobs = int(_number(body, "top_logprobs", 0, int))
    elif body.get("logprobs") is not None:
        logprobs = int(_number(body, "logprobs", 0, int))
    temperature = float(_number(body, "temperature", 1.0))
    if temperature > 2:
        raise ValueError(f"temperature must be in [0, 2], got {temperature}")
    return SamplingParams(
        n=int(_number(body, "n", 1, int)), temperature=temperature, top_p=float(_number(body, "top_p", 1.0)),
        top_k=int(_number(body, "top_k", -1, int)), seed=seed, max_tokens=max_tokens,
        min_tokens=int(_number(body, "min_tokens", 0, int)), stop=stop,
        stop_token_ids=body.get("stop_token_ids"), ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=logprobs)


def read_requests(path: Path) -> Iterator[Union[BatchRequest, BadRequest]]:
    """Every non-blank line of the input, parsed (a BadRequest for a line that cannot run)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield parse_line(text, n)
            except BadRequest as e:
                e.line = n
                yield e


def completed(output: Path) -> tuple[set[str], set[int]]:
    """custom_ids (and, for lines that had none, input line numbers) the output already answers.

    A last line cut short by a crash is removed from the file first, so appending goes on
    from a clean line end; any other unreadable line is skipped (its request runs again).
    Lines whose error code is in ``RETRIED`` are removed too (the file is replaced whole, so a
    crash leaves either version): their requests run again.
    """
    ids: set[str] = set()
    lines: set[int] = set()
    if not output.exists():
        return ids, lines
    with open(output, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a partly written last line (%d bytes); its request runs again",
                        output, len(data) - cut)
            f.truncate(cut)
            data = data[:cut]
    kept: list[bytes] = []
    for raw in data.splitlines(keepends=True):
        try:
            obj = json.loads(raw)
        except ValueError:
            log.warning("%s: skipping an unreadable line", output)
            kept.append(raw)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and obj["error"].get("code") in RETRIED:
            continue
        kept.append(raw)
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("custom_id"), str):
            ids.add(obj["custom_id"])
        elif isinstance(obj.get("line"), int):
            lines.add(obj["line"])
    if len(kept) < len(data.splitlines()):
        log.warning("%s: running the %d request(s) that failed on a damaged checkpoint again", output,
                    len(data.splitlines()) - len(kept))
        tmp = output.with_name(f".{output.name}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    return ids, lines


# -- results -------------------------------------------------------------------------------------


def error_entry(code: str, message: str, custom_id: Optional[str], line: Optional[int] = None) -> dict:
    entry = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
             "error": {"code": code, "message": message}}
    if custom_id is None and line is not None:
        entry["line"] = line  # lets a resumed run know this line was reported
    return entry


def result_entry(req: BatchRequest, out, model: str, tokenizer) -> dict:
    """The output line for a finished request (``out``: its RequestOutput)."""
    body = completion_body(req.kind, "chatcmpl-" if req.kind == "chat" else "cmpl-", model, out.outputs,
                           len(out.prompt_token_ids), tokenizer)
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def completion_body(kind: str, rid: str, model: str, outs: list, prompt_tokens: int, tokenizer) -> dict:
    """An OpenAI ``chat.completion`` / ``text_completion`` body; ``outs``: CompletionOutputs in index order.

    ``rid`` is the id, or just its prefix (``"cmpl-"``) to get a fresh one.
    """
    if rid.endswith("-"):
        rid += uuid.uuid4().hex
    choices = []
    for c in outs:
        lp = logprobs_of(kind, c.logprobs, tokenizer) if c.logprobs is not None else None
        if kind == "chat":
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in outs))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_of(kind: str, entries: list[dict], tokenizer) -> dict:
    """OpenAI's ``logprobs`` object for ``entries`` (``{"token", "logprob", "top"}`` per generated token)."""
    return _chat_logprobs(entries, tokenizer) if kind == "chat" else _completion_logprobs(entries, tokenizer)


def _tok(tokenizer, t: int) -> str:
    return tokenizer.decode([t]) if tokenizer is not None else str(t)


def _chat_logprobs(entries: list[dict], tokenizer) -> dict:
    content = []
    for lp in entries:
        s = _tok(tokenizer, lp["token"])
        content.append({"token": s, "logprob": lp["logprob"], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _tok(tokenizer, t), "logprob": v,
                                          "bytes": list(_tok(tokenizer, t).encode())} for t, v in lp["top"]]})
    return {"content": content}


def _completion_logprobs(entries: list[dict], tokenizer) -> dict:
    tokens = [_tok(tokenizer, lp["token"]) for lp in entries]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in entries],
            "top_logprobs": [{_tok(tokenizer, t): v for t, v in lp["top"]} for lp in entries],
            "text_offset": offsets}


# -- the job -------------------------------------------------------------------------------------


class _Writer:
    """Appends one JSON line per result and flushes it, so a crash loses at most the line being written."""

    def __init__(self, path: Path, on_result: Optional[Callable[[dict], None]]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.on_result = on_result
        self.written = 0

    def write(self, entry: dict) -> None:
        self.f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.f.flush()
        self.written += 1
        if self.on_result is not None:
            self.on_result(entry)

    def close(self) -> None:
        try:
            os.fsync(self.f.fileno())
        except OSError:
            pass
        self.f.close()


def _prompt(llm, req: BatchRequest) -> dict:
    """Token ids of the request's prompt, checked against the model (RequestError if unusable)."""
    from .tokenizer import chat_prompt, require

    if req.kind == "chat":
        msgs = [dict(m, content=_text_content(m["content"])) for m in req.body["messages"]]
        ids = chat_prompt(llm.tokenizer, msgs)
        text = None
    else:
        p = req.body["prompt"]
        p = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)) else p
        text = p if isinstance(p, str) else None
        ids = require(llm.tokenizer, "a text prompt").encode(p) if isinstance(p, str) else list(p)
    llm.engine.check_prompt(ids)
    return {"prompt_token_ids": ids, "prompt": text}


def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError("message content must be a string or a list of text parts")


def run_batch(llm, input_path: Union[str, Path], output_path: Union[str, Path], model: Optional[str] = None,
              explain: bool = False, use_tqdm: bool = True,
              on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every request of ``input_path`` not yet answered in ``output_path``; append the answers.

    ``explain``: return the throughput plan (``summary["plan"]``, text) without running.
    ``on_result`` is called with each entry after it is written. Returns a summary.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: no such input file")
    model = model or str(llm.config.model)
    done_ids, done_lines = completed(output_path)
    todo: list[BatchRequest] = []
    prompts: list[dict] = []
    errors: list[dict] = []  # written before the run starts
    duplicates: list[dict] = []  # written at the end, once the first copy is answered
    seen: set[str] = set()
    skipped = 0
    for item in read_requests(input_path):
        if isinstance(item, BadRequest):
            if item.custom_id in done_ids or (item.custom_id is None and item.line in done_lines):
                skipped += 1
                continue
            errors.append(error_entry(item.code, item.message, item.custom_id, item.line))
            if item.custom_id is not None:
                seen.add(item.custom_id)
            continue
        if item.custom_id in done_ids:
            skipped += 1
            continue
        if item.custom_id in seen:
            duplicates.append(error_entry("duplicate_custom_id", f"line {item.line}: custom_id {item.custom_id!r} "
                                          "appears earlier in the file; this line was not run", None, item.line))
            continue
        seen.add(item.custom_id)
        try:
            prompts.append(_prompt(llm, item))
        except (RequestError, MoetierError) as e:
            errors.append(error_entry("invalid_prompt", f"line {item.line}: {e}", item.custom_id))
            continue
        todo.append(item)
    summary = {"input": str(input_path), "output": str(output_path), "already_done": skipped,
               "to_run": len(todo), "errors": len(errors) + len(duplicates)}
    if explain:
        summary["plan"] = llm.plan(prompts, [r.params for r in todo]).explain() if todo else "nothing to run"
        return summary
    writer = _Writer(output_path, on_result)
    t0 = time.perf_counter()
    try:
        for e in errors:
            writer.write(e)
        if todo:
            answered: set[int] = set()
            try:
                for i, out in llm.iter_generate(prompts, [r.params for r in todo], mode="throughput",
                                                use_tqdm=use_tqdm):
                    writer.write(result_entry(todo[i], out, model, llm.tokenizer))
                    answered.add(i)
            except CheckpointError as e:  # every request left needed the bad bytes (see the module doc)
                log.error("the run stopped: %s", e)
                failed = [r for i, r in enumerate(todo) if i not in answered]
                for r in failed:
                    writer.write(error_entry("checkpoint_error", f"line {r.line}: generation failed: the model's "
                                             f"checkpoint is damaged: {e}", r.custom_id))
                summary["errors"] += len(failed)
                summary["checkpoint_error"] = str(e)
        for e in duplicates:
            writer.write(e)
    finally:
        writer.close()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["written"] = writer.written
    if todo and llm.last_run:
        summary["run"] = llm.last_run
    return summary
