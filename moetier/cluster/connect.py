"""Joining a Ray cluster: an address, ``auto`` (the cluster this machine belongs to) or ``local``
(a one-node cluster started here, on loopback)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..errors import MoetierError

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError:
        raise MoetierError("running on Ray needs the ray extra: pip install 'moetier[ray]' "
                           "(or pip install 'ray[data,serve]')") from None
    return ray


def connect(address: Optional[str] = "auto", num_cpus: Optional[int] = None,
            object_store_memory: Optional[int] = None) -> bool:
    """Connect this process to Ray; True if this call started the connection (the caller then
    ends it with ``ray.shutdown()``), False if it was already connected.

    ``address``: ``host:port`` of a cluster's head (``ray start --head`` prints it), ``ray://host:port``
    (Ray Client), ``auto`` (``$RAY_ADDRESS``, else the cluster started on this machine) or ``local``:
    a cluster of this machine alone, started now on 127.0.0.1 (``num_cpus``, ``object_store_memory``
    size it) and stopped at the end.
    """
    if address in (None, "local"):
        # without this, Ray swaps 127.0.0.1 for the machine's interface address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw = dict(logging_level=logging.WARNING, configure_logging=False)
    if address in (None, "local"):
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, **kw)
        return True
    try:
        ray.init(address=address, **kw)
    except ConnectionError as e:
        raise MoetierError(f"no Ray cluster at {address!r} ({e}); start one with `ray start --head "
                           "--node-ip-address=ADDR`, or pass --ray local for one on this machine") from None
    return True


def alive_nodes() -> list[dict]:
    """The cluster's live nodes, as ``ray.nodes()`` describes them."""
    ray = import_ray()
    return [n for n in ray.nodes() if n.get("Alive")]
