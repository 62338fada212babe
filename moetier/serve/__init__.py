"""OpenAI-compatible HTTP server on FastAPI + uvicorn (the ``serve`` extra): a thin adapter over the engine.

One :class:`~moetier.serve.worker.EngineWorker` thread owns each loaded model's ``llm.engine``;
the event loop parses requests, hands token ids to the worker and streams the text deltas it
sends back, so concurrent requests share the engine's decode steps. :func:`create_app` is the
ASGI app on its own, for another host to mount (Ray Serve, a bigger FastAPI app).

Nothing here is imported by ``import moetier``: the engine runs without the web packages.
"""

__all__ = ["EngineWorker", "ModelPool", "create_app", "make_server", "serve"]


def __getattr__(name):
    if name in ("make_server", "serve"):
        from . import server

        return getattr(server, name)
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "EngineWorker":
        from .worker import EngineWorker

        return EngineWorker
    if name == "ModelPool":
        from .pool import ModelPool

        return ModelPool
    raise AttributeError(name)
