"""``moetier serve``: the app on uvicorn, on a socket bound first so that a taken port or a bad host
is one clear line, and a graceful shutdown that lets streams finish for a while, then aborts them."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Optional

from ..errors import MoetierError
from .app import DEFAULT_MAX_REQUESTS, create_app
from .pool import ModelPool

GRACE_S = 10  # on SIGINT / SIGTERM, streams still running after this long are aborted


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port=0``: a free one); MoetierError says why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MoetierError(f"cannot listen on {host!r}: not an address or a known host name ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(1024)  # a burst of clients must not be reset
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MoetierError(f"cannot listen on {host}:{port}: the address is already in use "
                               "(another server?); pick another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise MoetierError(f"cannot listen on {host}:{port}: {host} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise MoetierError(f"cannot listen on {host}:{port}: permission denied (ports below 1024 need root)") \
                from None
        raise MoetierError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """A bound socket, the model pool and the app; :meth:`serve_forever` runs uvicorn on them."""

    def __init__(self, models: dict[str, str], load, host: str = "127.0.0.1", port: int = 8000,
                 api_key: Optional[str] = None, budget: Optional[int] = None,
                 max_requests: int = DEFAULT_MAX_REQUESTS, keep_alive: Optional[float] = None,
                 log_level: str = "info"):
        self.sock = bind(host, port)  # first: a taken port fails before anything else is made
        self.server_address = self.sock.getsockname()[:2]
        self.pool = ModelPool(models, load, budget)
        self.app = create_app(self.pool, api_key, max_requests, keep_alive)
        self.log_level = log_level

    def serve_forever(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=GRACE_S,
                                log_config=None, access_log=self.log_level == "debug")
        try:
            uvicorn.Server(config).run(sockets=[self.sock])
        finally:
            self.sock.close()


def make_server(models: dict[str, str], load, host: str = "127.0.0.1", port: int = 8000,
                api_key: Optional[str] = None, budget: Optional[int] = None,
                max_requests: int = DEFAULT_MAX_REQUESTS, keep_alive: Optional[float] = None,
                log_level: str = "info") -> Server:
    """A bound server over ``models`` (id -> checkpoint path), loaded on demand by ``load(id, path,
    device_memory)`` within ``budget`` bytes. ``port=0`` picks a free port (``server.server_address``)."""
    return Server(models, load, host, port, api_key, budget, max_requests, keep_alive, log_level)


def serve(server: Server) -> None:
    """Serve until interrupted (SIGINT / SIGTERM: streams get GRACE_S to finish)."""
    h, p = server.server_address[:2]
    names = ", ".join(server.pool.names())
    print(f"moetier: serving {names} on http://{h}:{p}/v1 (API docs: http://{h}:{p}/docs)", flush=True)
    logging.getLogger(__name__).info("listening on %s:%s", h, p)
    server.serve_forever()
