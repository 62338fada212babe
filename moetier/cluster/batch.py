"""An OpenAI batch file over engine replicas on a Ray cluster, with the local batch's guarantees.

The driver (this process) reads the input and the output (:func:`~moetier.batch_file.plan_job`),
cuts the requests to run into chunks and, once the replicas are loaded, hands them to
``MoetierReplica`` actors as they ask for work; each replica streams back one entry per request
as it finishes, and only the driver writes the output file, so every ``custom_id`` is answered
exactly once, appended as it finishes, and a rerun resumes as the local batch does. A replica that dies (its process killed, its node lost)
has its unanswered requests put back at the head of the queue for the others, and the driver
starts a replacement (up to ``max_restarts`` per replica). A request whose replicas died under it
``MAX_ATTEMPTS`` times gets a ``replica_lost`` error line, which a later run runs again. The job
fails only when no replica is left; what it had written stays, and a rerun goes on from there.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..batch_file import BatchRequest, ResultWriter, error_entry, plan_job
from ..errors import MoetierError
from .connect import alive_nodes, connect, import_ray

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # replicas a request may see die under it before it gets a replica_lost line
START_TIMEOUT_S = 600.0  # a replica not placed and loaded by then counts as failed to start


@dataclass
class Replica:
    """One slot of the job: the actor now in it and what it has done."""

    name: str
    actor: object = None
    info: dict = field(default_factory=dict)
    requests: int = 0
    tokens: int = 0
    lost: int = 0  # actors of this slot that died
    error: Optional[str] = None  # why the slot gave up, when it did

    def as_dict(self) -> dict:
        d = {"name": self.name, "requests": self.requests, "completion_tokens": self.tokens, "lost": self.lost,
             **{k: self.info[k] for k in ("node_ip", "node_id", "pid", "load_s") if k in self.info}}
        if self.error:
            d["error"] = self.error
        return d


def _lost_errors():
    ray = import_ray()
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "ActorUnavailableError", "WorkerCrashedError",
                                          "NodeDiedError", "ObjectLostError", "OwnerDiedError") if hasattr(ex, n))


class _Job:
    """The shared state of the driver's threads: the work queue, the slots, the results queue."""

    def __init__(self, chunks: list[list[BatchRequest]], model: Optional[str], start: Callable[[Replica], None],
                 max_restarts: int):
        self.work = deque(chunks)
        self.model = model
        self.start = start
        self.restarts_left = max_restarts
        self.inflight = 0
        self.cond = threading.Condition()
        self.results: queue.Queue = queue.Queue()
        self.attempts: dict[str, int] = {}
        self.retries = 0
        self.stop = False
        self.starting = 0  # first replicas not yet loaded: work is handed out once all are (or failed)
        self.ready_at: Optional[float] = None  # when they were

    def take(self) -> Optional[list[BatchRequest]]:
        """The next chunk, waiting while others run (theirs may come back); None once all is done."""
        with self.cond:
            while (self.starting or (not self.work and self.inflight)) and not self.stop:
                self.cond.wait()
            if not self.work or self.stop:
                return None
            self.inflight += 1
            return self.work.popleft()

    def put_back(self, chunk: list[BatchRequest], done: set[str]) -> None:
        rest, given_up = [], []
        for r in chunk:
            if r.custom_id in done:
                continue
            self.attempts[r.custom_id] = self.attempts.get(r.custom_id, 0) + 1
            (given_up if self.attempts[r.custom_id] >= MAX_ATTEMPTS else rest).append(r)
        for r in given_up:
            self.results.put(("entry", None, error_entry(
                "replica_lost", f"line {r.line}: the replicas running this request died or failed {MAX_ATTEMPTS} "
                "times; a rerun runs it again", r.custom_id)))
        with self.cond:
            if rest:
                self.work.appendleft(rest)
                self.retries += len(rest)
            self.inflight -= 1
            self.cond.notify_all()

    def started(self) -> None:
        with self.cond:
            self.starting -= 1
            if self.starting == 0:
                self.ready_at = time.perf_counter()
            self.cond.notify_all()

    def finished(self) -> None:
        with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    def restart(self) -> bool:
        with self.cond:
            if self.restarts_left <= 0 or self.stop:
                return False
            self.restarts_left -= 1
            return True

    def serve(self, slot: Replica) -> None:
        """A driver thread: feed one slot's replica until the work is done or no replica can be kept."""
        ray = import_ray()
        lost = _lost_errors()
        try:
            while True:
                if slot.actor is None:
                    if not self.restart():
                        return
                    try:
                        self.start(slot)
                    except (MoetierError, *lost) as e:
                        if self.stop:  # the job ended while it loaded
                            return
                        slot.lost += 1
                        slot.error = f"a replacement for {slot.name} failed to start: {_why(e)}"
                        continue
                chunk = self.take()
                if chunk is None:
                    return
                done: set[str] = set()
                try:
                    for ref in slot.actor.answer.options(num_returns="streaming").remote(chunk, self.model):
                        entry = ray.get(ref)
                        done.add(entry["custom_id"])
                        self.results.put(("entry", slot, entry))
                except lost as e:
                    if self.stop:  # the job is over: the driver ended its replicas
                        return
                    slot.lost += 1
                    slot.actor = None
                    self.results.put(("lost", slot, f"{slot.name} died ({_why(e)}); {len(chunk) - len(done)} "
                                                    "of its requests run again"))
                    self.put_back(chunk, done)
                except ray.exceptions.RayTaskError as e:  # the engine raised: the replica lives on
                    self.results.put(("failed", slot, f"{slot.name} failed a chunk ({_why(e)}); it runs again"))
                    self.put_back(chunk, done)
                else:
                    self.finished()
        finally:
            self.results.put(("exit", slot, None))


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _replica_count(replicas: Union[int, str], nodes: list[dict]) -> int:
    if replicas == "auto":
        return max(1, len(nodes))
    try:
        n = int(replicas)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise MoetierError(f"--replicas must be a positive number or auto, got {replicas!r}")
    return n


def run_batch_ray(input_path: Union[str, Path], output_path: Union[str, Path], llm_options: dict,
                  model: Optional[str] = None, replicas: Union[int, str] = "auto", address: Optional[str] = "auto",
                  threads: Optional[int] = None, chunk_size: Optional[int] = None, use_tqdm: bool = True,
                  on_result: Optional[Callable[[dict], None]] = None, retry_errors: bool = False,
                  max_restarts: int = 3, machine_profile=None) -> dict:
    """Run the batch file ``input_path`` on ``replicas`` MoetierReplica actors; append to ``output_path``.

    ``llm_options``: the keyword arguments of :class:`~moetier.llm.LLM` each replica loads its
    engine with (the model path must be readable on every node). ``replicas``: a number, or
    ``auto``: one per live node, each pinned to its node. ``threads``: CPUs each replica reserves
    and its torch threads (default 1). ``chunk_size``: requests handed to a replica at a time
    (default: the job in two chunks per replica, one chunk with one replica). ``address``: see
    :func:`~moetier.cluster.connect.connect`. ``max_restarts``: replacements per replica for those
    that die. ``machine_profile``: the planner's machine rates for every replica (default: each
    measures its own). ``on_result(entry, replica)`` is called after each entry is written, with the
    replica that answered (its name, node, pid and counts; None for lines that never ran).
    Returns a summary: requests, tokens/s, per-replica counts, retries.
    """
    job_in = plan_job(input_path, output_path, model, retry_errors)
    owned = connect(address)
    ray = import_ray()
    try:
        return _run(ray, job_in, Path(input_path), Path(output_path), llm_options, model, replicas, threads,
                    chunk_size, use_tqdm, on_result, max_restarts, machine_profile)
    finally:
        if owned:
            ray.shutdown()


def _run(ray, job_in, input_path, output_path, llm_options, model, replicas, threads, chunk_size, use_tqdm,
         on_result, max_restarts, machine_profile) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .replica import replica_class

    nodes = alive_nodes()
    n = _replica_count(replicas, nodes)
    todo = job_in.todo
    size = chunk_size or max(1, math.ceil(len(todo) / (2 * n if n > 1 else 1)))
    if size < 1:
        raise MoetierError(f"chunk_size must be at least 1, got {chunk_size}")
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    device = llm_options.get("device", "cpu")
    cls = replica_class()
    pinned = {}  # slot name -> node id: with replicas=auto, one replica on each node
    if replicas == "auto":
        pinned = {f"replica-{i}": node["NodeID"] for i, node in enumerate(nodes[:n])}

    def start(slot: Replica) -> None:
        node = pinned.get(slot.name)
        strategy = NodeAffinitySchedulingStrategy(node, soft=True) if node else "SPREAD"
        slot.actor = cls.options(num_cpus=threads or 1, num_gpus=1 if str(device).startswith("cuda") else 0,
                                 max_restarts=0, scheduling_strategy=strategy).remote(
            llm_options, threads, machine_profile)
        ready, _ = ray.wait([ref := slot.actor.info.remote()], timeout=START_TIMEOUT_S)
        if not ready:
            ray.kill(slot.actor)
            slot.actor = None
            raise MoetierError(f"{slot.name} was not placed and loaded within {START_TIMEOUT_S:.0f} s: does the "
                               f"cluster have {threads or 1} free CPU(s) per replica?")
        slot.info = ray.get(ref)
        slot.info["node_ip"] = next((x["NodeManagerAddress"] for x in alive_nodes()
                                     if x["NodeID"] == slot.info["node_id"]), None)

    summary = {"input": str(input_path), "output": str(output_path), "already_done": job_in.already_done,
               "to_run": len(todo), "errors": len(job_in.errors) + len(job_in.duplicates), "replicas": [],
               "retries": 0, "replicas_lost": 0}
    writer = ResultWriter(output_path, None)
    slots = [Replica(f"replica-{i}") for i in range(n)]
    job = _Job(chunks, model, start, max_restarts * n)
    t0 = time.perf_counter()
    bar = None
    try:
        for e in job_in.errors:
            writer.write(e)
        if todo:
            bar = _bar(len(todo), use_tqdm)
            _drive(job, slots, todo, writer, bar, summary, start, t0, on_result)
        for e in job_in.duplicates:
            writer.write(e)
    finally:
        with job.cond:
            job.stop = True
            job.cond.notify_all()
        for s in slots:
            if s.actor is not None:
                ray.kill(s.actor)
        if bar is not None:
            bar.close()
        writer.close()
    end = time.perf_counter()
    seconds = end - t0
    tokens = sum(s.tokens for s in slots)
    if job.ready_at is not None:  # the replicas' start (model loads) and the run after it
        summary.update(ready_s=round(job.ready_at - t0, 3), run_s=round(end - job.ready_at, 3))
    summary.update(seconds=round(seconds, 3), written=writer.written, completion_tokens=tokens,
                   tok_s=round(tokens / seconds, 2) if seconds > 0 else 0.0, retries=job.retries,
                   replicas_lost=sum(s.lost for s in slots), replicas=[s.as_dict() for s in slots])
    return summary


def _drive(job: _Job, slots: list[Replica], todo: list[BatchRequest], writer, bar, summary: dict, start,
           t0: float, on_result) -> None:
    """Start the slots' threads and write what they send until every request is answered."""
    lost = _lost_errors()
    job.starting = len(slots)
    for s in slots:  # the first replicas start together; one that fails is retried by its thread
        threading.Thread(target=_first_start, args=(job, s, start, lost), daemon=True,
                         name=f"moetier-{s.name}").start()
    wanted = {r.custom_id for r in todo}
    written: set[str] = set()
    running = len(slots)
    while wanted - written:
        if running == 0:
            why = "; ".join(s.error for s in slots if s.error) or "they died"
            raise MoetierError(f"no replica could be kept alive ({why}); {len(wanted - written)} requests are "
                               f"unanswered: run the same command again to resume")
        try:
            kind, slot, payload = job.results.get(timeout=1.0)
        except queue.Empty:
            continue
        if kind == "exit":
            running -= 1
        elif kind in ("lost", "failed"):
            log.warning("%s", payload)
        elif payload["custom_id"] not in written:  # "entry"
            written.add(payload["custom_id"])
            writer.write(payload)
            if payload["response"] is None:
                summary["errors"] += 1
            if slot is not None:
                slot.requests += 1
                slot.tokens += payload["response"]["body"]["usage"]["completion_tokens"] if payload["response"] else 0
            if on_result is not None:
                on_result(payload, slot.as_dict() if slot is not None else None)
            if bar is not None:
                toks = sum(s.tokens for s in slots)
                bar.update(1)
                bar.set_postfix_str(f"{toks / max(time.perf_counter() - t0, 1e-9):.1f} tok/s, "
                                    f"{sum(s.actor is not None for s in slots)}/{len(slots)} replicas, "
                                    f"{job.retries} retried", refresh=False)


def _first_start(job: _Job, slot: Replica, start, lost) -> None:
    try:
        start(slot)
    except (MoetierError, *lost) as e:
        slot.actor = None
        slot.lost += 1
        slot.error = f"{slot.name} failed to start: {_why(e)}"
        log.warning("%s", slot.error)
    finally:
        job.started()
    job.serve(slot)


def _bar(total: int, use_tqdm: bool):
    if not use_tqdm:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Batch (ray)", unit="req")
