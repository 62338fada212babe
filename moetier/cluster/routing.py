"""``MoetierRequestRouter``: Ray Serve's own power-of-two-choices request router, told to also
report the set of running replicas of its deployment each time Serve's controller updates it
(:mod:`moetier.cluster.replica_sets`). A replica that leaves the set while alive is being drained
(scale-down, a redeploy, its node drained): Serve sends it nothing new and stops it once its
requests end, so the router moves its streams to a replica still in the set
(:mod:`moetier.cluster.migrate`).

Serve ships this module to the router's process by value, so it holds no state of its own.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter


class MoetierRequestRouter(PowerOfTwoChoicesRequestRouter):
    def update_replicas(self, replicas):
        super().update_replicas(replicas)
        from moetier.cluster.replica_sets import replicas_changed  # the process's own module, by name

        replicas_changed(self._deployment_id.name, {r.replica_id.unique_id for r in replicas})

    def on_replica_actor_died(self, replica_id):
        """A request found the replica dead: Serve routes nothing more to it, before its controller knows."""
        super().on_replica_actor_died(replica_id)
        from moetier.cluster.replica_sets import replica_died

        replica_died(self._deployment_id.name, replica_id.unique_id)
