"""moetier on a Ray cluster (the ``ray`` extra): batch files spread over engine replicas
(:func:`~moetier.cluster.batch.run_batch_ray`, ``moetier batch --ray``) and the OpenAI app on Ray
Serve (``moetier serve --ray``).

Ray does the scheduling, the RPC and the failure detection: each replica is a Ray actor whose class
name starts with ``Moetier`` (``MoetierReplica``), so ``ps`` shows ``ray::MoetierReplica`` and Ray's
tools list it. Nothing here is imported by ``import moetier``.
"""

__all__ = ["connect", "run_batch_ray"]


def __getattr__(name):
    if name == "run_batch_ray":
        from .batch import run_batch_ray

        return run_batch_ray
    if name == "connect":
        from .connect import connect

        return connect
    raise AttributeError(name)
