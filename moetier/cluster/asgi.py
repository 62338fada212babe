"""Calling an ASGI app in-process, the response streamed back as it is sent: how a model replica
runs moetier's FastAPI app (moetier/serve/app.py) for a request the router forwarded."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


class Lifespan:
    """The app's lifespan (startup once, shutdown at :meth:`close`), run in this event loop."""

    def __init__(self, app):
        self.app = app
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._started = asyncio.Event()
        self._task = None

    async def start(self) -> None:
        if self._task is not None:
            return await self._started.wait()
        await self._inbox.put({"type": "lifespan.startup"})

        async def send(msg):
            if msg["type"].startswith("lifespan.startup"):
                self._started.set()

        self._task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                    self._inbox.get, send))
        await self._started.wait()

    async def close(self) -> None:
        if self._task is not None:
            await self._inbox.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(self._task, 30)


async def call(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
               body: bytes) -> AsyncIterator[object]:
    """Run one HTTP request through ``app``; yield ``(status, headers)`` first, then each body chunk."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    out: asyncio.Queue = asyncio.Queue()
    sent = False
    disconnect = asyncio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()  # the app asks only to see whether the client left
        return {"type": "http.disconnect"}

    async def send(msg):
        await out.put(msg)

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:  # the app returned: drain what it sent, then stop
                getter.cancel()
                while not out.empty():
                    for item in _items(out.get_nowait()):
                        yield item
                task.result()
                return
            msg = getter.result()
            for item in _items(msg):
                yield item
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                return
    finally:
        disconnect.set()  # the caller stopped reading: the app sees the client go
        if not task.done():
            await asyncio.wait({task}, timeout=10)


def _items(msg: dict) -> list:
    if msg["type"] == "http.response.start":
        return [(msg["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])])]
    if msg["type"] == "http.response.body" and msg.get("body"):
        return [bytes(msg["body"])]
    return []
