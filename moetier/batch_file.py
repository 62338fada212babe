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
same output (once the checkpoint is repaired) removes them and runs their requests again. So are
``replica_lost`` lines (``moetier batch --ray``: the replicas running a request kept dying).
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

from .cascade import answered_by
from .errors import CheckpointError, MoetierError, RequestError
from .openai_api import check_shape, prompts_of, sampling_params, text_content
from .openai_bodies import completion_body, completion_choice, logprobs_of, usage  # noqa: F401 - re-exported
from .runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
RETRIED = ("checkpoint_error", "replica_lost")  # error codes of lines that a later run removes and runs again
_text_content = text_content


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
    if body.get("stream"):
        raise BadRequest("invalid_body", f"line {line}: stream is not available in a batch", cid)
    if kind == "chat" and body.get("tools"):
        raise BadRequest("invalid_body", f"line {line}: tools are served by moetier serve, not in a batch", cid)
    if kind == "completion" and body.get("echo"):
        raise BadRequest("invalid_body", f"line {line}: echo is served by moetier serve, not in a batch", cid)
    try:
        _check_prompt_shape(body, kind)
        params = sampling_params(body, kind)
        if params.structured_outputs is not None:
            params.structured_outputs.grammar_text()  # a bad schema is this line's error, not the run's
    except (ValueError, TypeError) as e:
        raise BadRequest("invalid_body", f"line {line}: {e}", cid) from None
    return BatchRequest(line, cid, kind, body, params)


def _check_prompt_shape(body: dict, kind: str) -> None:
    check_shape(body, kind)


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


def completed(output: Path, retry_errors: bool = False) -> tuple[set[str], set[int]]:
    """custom_ids (and, for lines that had none, input line numbers) the output already answers.

    A last line cut short by a crash is removed from the file first, so appending goes on
    from a clean line end; any other unreadable line is skipped (its request runs again).
    Lines whose error code is in ``RETRIED`` (with ``retry_errors``: every error line) are removed
    too (the file is replaced whole, so a crash leaves either version): their requests run again.
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
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and (
                retry_errors or obj["error"].get("code") in RETRIED):
            continue
        kept.append(raw)
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("custom_id"), str):
            ids.add(obj["custom_id"])
        elif isinstance(obj.get("line"), int):
            lines.add(obj["line"])
    if len(kept) < len(data.splitlines()):
        log.warning("%s: running the %d request(s) whose last result was an error again", output,
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


def result_entry(req: BatchRequest, outs: list, model: str, tokenizer) -> dict:
    """The output line for a finished request (``outs``: a RequestOutput per prompt of the request)."""
    choices = [completion_choice(req.kind, p * req.params.n + c.index, c, tokenizer)
               for p, out in enumerate(outs) for c in out.outputs]
    body = completion_body(req.kind, "chatcmpl-" if req.kind == "chat" else "cmpl-", model, [],
                           sum(len(o.prompt_token_ids) for o in outs), tokenizer, choices=choices,
                           completion_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


# -- the job -------------------------------------------------------------------------------------


class ResultWriter:
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


def _prompts(llm, req: BatchRequest) -> list[dict]:
    """The request's prompts as token ids, checked against the model (RequestError if unusable)."""
    from .openai_api import check_context
    from .tokenizer import chat_prompt, require

    if req.kind == "chat":
        msgs = [dict(m, content=text_content(m.get("content") or "")) for m in req.body["messages"]]
        items = [(None, chat_prompt(llm.tokenizer, msgs))]
    else:
        items = [(p, require(llm.tokenizer, "a text prompt").encode(p)) if isinstance(p, str) else (None, list(p))
                 for p in prompts_of(req.body)]
    for _, ids in items:
        llm.engine.check_prompt(ids)
        check_context(len(ids), req.params.max_tokens, llm.engine.max_model_len)
    return [{"prompt_token_ids": ids, "prompt": text} for text, ids in items]


@dataclass
class BatchJob:
    """What a run of ``input`` against ``output`` has to do, read before anything loads."""

    todo: list[BatchRequest]  # the requests to run, in input order
    errors: list[dict]  # entries for lines that cannot run, written before the run starts
    duplicates: list[dict]  # entries for later copies of an id, written at the end
    already_done: int  # lines the output already answers


def plan_job(input_path: Union[str, Path], output_path: Union[str, Path], model: Optional[str] = None,
             retry_errors: bool = False) -> BatchJob:
    """Read ``input_path`` against what ``output_path`` already answers (see :func:`completed`).

    Given ``model``, a ``body.model`` naming another model is an error entry. Needs no model loaded.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: no such input file")
    done_ids, done_lines = completed(output_path, retry_errors)
    job = BatchJob([], [], [], 0)
    seen: set[str] = set()
    for item in read_requests(input_path):
        cid = item.custom_id
        first = cid is None or cid not in seen
        if cid is not None:
            seen.add(cid)
        if not first:  # a later copy of an id: its error entry (by line) whether or not the first ran
            if item.line in done_lines:
                job.already_done += 1
            else:
                job.duplicates.append(error_entry("duplicate_custom_id", f"line {item.line}: custom_id {cid!r} "
                                                  "appears earlier in the file; this line was not run", None,
                                                  item.line))
            continue
        if cid in done_ids or (cid is None and item.line in done_lines):
            job.already_done += 1
            continue
        if isinstance(item, BadRequest):
            job.errors.append(error_entry(item.code, item.message, cid, item.line))
            continue
        asked = item.body.get("model")
        if model is not None and asked is not None and asked not in (model, Path(model).name):
            job.errors.append(error_entry("model_not_found", f"line {item.line}: body.model is {asked!r}, but this "
                                          f"run serves {model!r}", cid))
            continue
        job.todo.append(item)
    return job


@dataclass
class _Tokenized:
    todo: list[BatchRequest]  # the requests whose prompts fit the model
    groups: list[list[int]]  # per request in todo: its prompts' indices in ``prompts``
    prompts: list[dict]
    errors: list[dict]  # the others' error entries

    def params(self) -> list[SamplingParams]:
        return [self.todo[g].params for g, idx in enumerate(self.groups) for _ in idx]


def _tokenize(llm, requests: list[BatchRequest]) -> _Tokenized:
    t = _Tokenized([], [], [], [])
    for item in requests:
        try:
            mine = _prompts(llm, item)
        except (RequestError, MoetierError, ValueError) as e:
            code = "context_length_exceeded" if "context length" in str(e) else "invalid_prompt"
            t.errors.append(error_entry(code, f"line {item.line}: {e}", item.custom_id))
            continue
        t.groups.append(list(range(len(t.prompts), len(t.prompts) + len(mine))))
        t.prompts.extend(mine)
        t.todo.append(item)
    return t


def _generate(llm, t: _Tokenized, model: str, use_tqdm: bool, report: dict) -> Iterator[dict]:
    """Each request's result entry as it finishes; on a damaged checkpoint, error entries for the rest
    (``report["errors"]`` counts them, ``report["checkpoint_error"]`` says why)."""
    owner = {i: g for g, idx in enumerate(t.groups) for i in idx}
    answered: set[int] = set()
    got: dict[int, object] = {}
    try:
        for i, out in llm.iter_generate(t.prompts, t.params(), mode="throughput", use_tqdm=use_tqdm):
            got[i] = out
            g = owner[i]
            if all(j in got for j in t.groups[g]):
                outs = [got.pop(j) for j in t.groups[g]]
                answered.add(g)
                # a cascade's answers (moetier batch --cascade) name the model that gave them
                yield result_entry(t.todo[g], outs, answered_by(outs) or model, llm.tokenizer)
    except CheckpointError as e:  # every request left needed the bad bytes (see the module doc)
        log.error("the run stopped: %s", e)
        failed = [r for g, r in enumerate(t.todo) if g not in answered]
        report["errors"] = report.get("errors", 0) + len(failed)
        report["checkpoint_error"] = str(e)
        for r in failed:
            yield error_entry("checkpoint_error", f"line {r.line}: generation failed: the model's "
                              f"checkpoint is damaged: {e}", r.custom_id)


def answer(llm, requests: list[BatchRequest], model: Optional[str] = None, use_tqdm: bool = False,
           report: Optional[dict] = None) -> Iterator[dict]:
    """The output entry of each of ``requests`` (from :func:`plan_job`), yielded as it is ready: first
    those whose prompt cannot run, then each result as it finishes, in one throughput run.
    ``report`` (a dict) gets ``errors`` and, on a damaged checkpoint, ``checkpoint_error``."""
    report = {} if report is None else report
    t = _tokenize(llm, requests)
    report["errors"] = report.get("errors", 0) + len(t.errors)
    yield from t.errors
    if t.todo:
        yield from _generate(llm, t, model or str(llm.config.model), use_tqdm, report)


def run_batch(llm, input_path: Union[str, Path], output_path: Union[str, Path], model: Optional[str] = None,
              explain: bool = False, use_tqdm: bool = True,
              on_result: Optional[Callable[[dict], None]] = None, retry_errors: bool = False) -> dict:
    """Run every request of ``input_path`` not yet answered in ``output_path``; append the answers.

    ``explain``: return the throughput plan (``summary["plan"]``, text) without running.
    ``on_result`` is called with each entry after it is written. ``retry_errors``: lines whose
    last result was an error run again. Given ``model`` (the CLI's ``--model``), a ``body.model``
    naming another model is an error entry.
    Returns a summary.
    """
    job = plan_job(input_path, output_path, model, retry_errors)
    model = model or str(llm.config.model)
    t = _tokenize(llm, job.todo)
    summary = {"input": str(input_path), "output": str(output_path), "already_done": job.already_done,
               "to_run": len(t.todo), "errors": len(job.errors) + len(t.errors) + len(job.duplicates)}
    if explain:
        summary["plan"] = llm.plan(t.prompts, t.params()).explain() if t.todo else "nothing to run"
        return summary
    writer = ResultWriter(Path(output_path), on_result)
    t0 = time.perf_counter()
    try:
        for e in job.errors + t.errors:
            writer.write(e)
        if t.todo:
            for e in _generate(llm, t, model, use_tqdm, summary):
                writer.write(e)
        for e in job.duplicates:
            writer.write(e)
    finally:
        writer.close()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["written"] = writer.written
    if t.todo and llm.last_run:
        summary["run"] = llm.last_run
    return summary
