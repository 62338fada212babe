"""OpenAI-compatible HTTP server: a thin adapter over the engine (stdlib only).

One :class:`~moetier.serve.worker.EngineWorker` thread owns ``llm.engine``; the
HTTP handler threads parse requests, hand token ids to the worker through a
queue and read text deltas back from a per-request queue, so concurrent
requests share the engine's decode steps.
"""

from .app import make_server, serve
from .worker import EngineWorker

__all__ = ["EngineWorker", "make_server", "serve"]
