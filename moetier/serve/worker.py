"""The one thread that owns the engine; HTTP handler threads talk to it through queues."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..errors import RequestError
from ..runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

# messages put on a request's queue, in order:
#   ("started", None)                     the engine took the request
#   ("prompt", prompt_logprobs)           with SamplingParams(prompt_logprobs=k), before the first delta
#   ("delta", (index, text, finish, lps, ids)) new text for completion ``index`` (finish: None or a reason;
#                                         lps: logprob entries of the tokens since the last delta, or None;
#                                         ids: the token ids generated since the last delta)
#   ("done", Finished)                    every completion finished
#   ("error", Exception)                  the request failed (before "started": RequestError)
# ``out`` is anything with ``put(message)``: a queue.Queue, or the server's sink into an asyncio queue


@dataclass
class Finished:
    outs: list  # CompletionOutputs in index order
    prompt_logprobs: Optional[list] = None  # with SamplingParams(prompt_logprobs=k): vLLM's list


@dataclass
class _Live:
    out: "queue.Queue"
    seqs: list = field(default_factory=list)
    sent_logprobs: dict = field(default_factory=dict)  # completion index -> logprob entries already sent
    sent_ids: dict = field(default_factory=dict)  # completion index -> token ids already sent
    prompt_sent: bool = False

    def new_logprobs(self, out) -> "list | None":
        if out.logprobs is None:
            return None
        start = self.sent_logprobs.get(out.index, 0)
        self.sent_logprobs[out.index] = len(out.logprobs)
        return out.logprobs[start:]

    def new_ids(self, out) -> list:
        start = self.sent_ids.get(out.index, 0)
        self.sent_ids[out.index] = len(out.token_ids)
        return list(out.token_ids[start:])


class EngineWorker:
    """Runs ``llm.engine`` on its own thread: ``submit`` a request, read its queue, ``abort`` it."""

    def __init__(self, llm):
        self.llm = llm
        self._cmds: queue.Queue = queue.Queue()
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._loop, name="moetier-engine", daemon=True)
        self._stopping = False
        self.aborted = 0  # requests dropped before they finished (clients that went away)

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def live(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._live)

    def waiting(self) -> int:
        """Sequences queued in the engine, not yet running."""
        return len(self.llm.engine.waiting)

    def running(self) -> int:
        """Sequences in the engine's running batch."""
        return len(self.llm.engine.running)

    def stop(self, wait: Optional[float] = None) -> None:
        """Stop after the current step; wait up to ``wait`` seconds (None: until it has stopped)."""
        self._stopping = True
        self._cmds.put(("stop",))
        while self._thread.is_alive():
            self._thread.join(timeout=10 if wait is None else wait)
            if wait is not None:
                break
            if self._thread.is_alive():
                log.warning("waiting for the engine thread's step to end")

    def submit(self, prompt_ids: list[int], params: SamplingParams, out=None) -> tuple[str, object]:
        """Queue a request; returns its id and the queue (``out``, or a new queue.Queue) its messages go to."""
        rid = uuid.uuid4().hex
        out = queue.Queue() if out is None else out
        self._cmds.put(("add", rid, prompt_ids, params, out))
        return rid, out

    def abort(self, rid: str) -> None:
        """Drop a request (its client went away); safe to call for a finished one."""
        self._cmds.put(("abort", rid))

    # -- engine thread ------------------------------------------------------------------------

    def _handle(self, cmd) -> None:
        engine = self.llm.engine
        if cmd[0] == "add":
            _, rid, ids, params, out = cmd
            try:
                seqs = engine.add_request(rid, ids, params)
            except Exception as e:  # RequestError, or a bug: this request fails, the thread goes on
                if not isinstance(e, RequestError):
                    log.exception("adding a request failed")
                out.put(("error", e))
                return
            self._live[rid] = _Live(out, seqs)
            out.put(("started", None))
        elif cmd[0] == "abort":
            if self._live.pop(cmd[1], None) is not None:
                engine.abort(cmd[1])
                self.aborted += 1
        elif cmd[0] == "stop":
            self._stopping = True

    def _loop(self) -> None:
        engine = self.llm.engine
        while not self._stopping:
            # block while idle; when busy, take whatever arrived and step again
            try:
                cmd = self._cmds.get(timeout=None if not engine.has_unfinished() else 0)
                self._handle(cmd)
                while True:
                    self._handle(self._cmds.get_nowait())
            except queue.Empty:
                pass
            if self._stopping or not engine.has_unfinished():
                continue
            try:
                events = engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                # (a damaged checkpoint: a CheckpointError naming the file, layer and expert). The
                # sequences of the step are still engine.running; those still waiting run later.
                log.exception("engine step failed")
                for rid in {s.request_id for s in engine.running}:
                    engine.abort(rid)
                    live = self._live.pop(rid, None)
                    if live is not None:
                        live.out.put(("error", e))
                continue
            for ev in events:
                live = self._live.get(ev.seq.request_id)
                if live is not None and (ev.delta or ev.finished):
                    sink = live.seqs[0].prompt_sink
                    if sink is not None and not live.prompt_sent:  # its prompt has run whole by now
                        live.prompt_sent = True
                        live.out.put(("prompt", sink.entries))
                    out = ev.seq.out
                    live.out.put(("delta", (out.index, ev.delta, out.finish_reason, live.new_logprobs(out),
                                             live.new_ids(out))))
            for rid, live in list(self._live.items()):
                if all(s.finished for s in live.seqs):
                    del self._live[rid]
                    sink = live.seqs[0].prompt_sink
                    live.out.put(("done", Finished([s.out for s in live.seqs],
                                                   sink.entries if sink is not None else None)))
