"""The replica sets of each model's deployment as the router's process last heard them from Serve
(reported by :class:`~moetier.cluster.routing.MoetierRequestRouter`), and the streams waiting on
a change."""

from __future__ import annotations

import asyncio
import threading

_lock = threading.Lock()
_running: dict[str, frozenset] = {}  # deployment name -> unique ids of its running replicas
_known: set = set()  # deployments whose set has been reported at least once
_waiters: list = []  # (loop, event) of the streams waiting for a change


def replicas_changed(deployment: str, ids: set) -> None:
    with _lock:
        _running[deployment] = frozenset(ids)
        _known.add(deployment)
        waiters = list(_waiters)
    for loop, ev in waiters:
        loop.call_soon_threadsafe(ev.set)


def replica_died(deployment: str, replica: str) -> None:
    with _lock:
        if replica in _running.get(deployment, ()):
            _running[deployment] = _running[deployment] - {replica}


def running(deployment: str):
    """The running replicas' ids, or None before Serve has reported any set for the deployment."""
    with _lock:
        return _running.get(deployment) if deployment in _known else None


class Watch:
    """An event set on every change of any deployment's replica set (a stream waits on it)."""

    def __init__(self):
        self.event = asyncio.Event()
        self._entry = (asyncio.get_running_loop(), self.event)
        with _lock:
            _waiters.append(self._entry)

    def close(self) -> None:
        with _lock:
            if self._entry in _waiters:
                _waiters.remove(self._entry)
