"""``MoetierReplica``: one engine (an :class:`~moetier.llm.LLM`) in a Ray actor, answering batch
requests as a stream, one entry per request as it finishes."""

from __future__ import annotations

import os
import time
from typing import Optional

import ray

from ..batch_file import BatchRequest, answer


class MoetierReplica:
    """An engine replica. Created through :func:`replica_class` (a Ray actor); ``ps`` titles its
    process ``ray::MoetierReplica``."""

    def __init__(self, llm_options: dict, threads: Optional[int] = None, machine_profile=None):
        t0 = time.perf_counter()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from ..llm import LLM

        self.llm = LLM(**llm_options)
        if machine_profile is not None:  # the planner's machine rates, given instead of measured here
            self.llm.machine_profile = machine_profile
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        """Where this replica runs: process id, Ray node id, seconds its model took to load."""
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "load_s": round(self.load_s, 3)}

    def answer(self, requests: list[BatchRequest], model: Optional[str] = None):
        """Each request's output entry as it is ready (a Ray streaming generator)."""
        yield from answer(self.llm, requests, model)

    def close(self) -> None:
        self.llm.close()


def replica_class():
    """MoetierReplica as a Ray actor class."""
    return ray.remote(MoetierReplica)
