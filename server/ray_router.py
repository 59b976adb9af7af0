"""The Replica deployment's request router (``server.ray_serve``): prefix affinity balanced
against queue length, on Ray Serve's public ``RequestRouter`` API. Ray imports it by name in
every process that routes to the replicas."""

from __future__ import annotations

import logging
import random
import zlib

from ray.serve.request_router import RequestRouter

from server.ray_serve import PrefixIndex, prefix_keys

log = logging.getLogger(__name__)


class PrefixAffinityRouter(RequestRouter):
    """Ranks the replica holding the request's longest prefix first, unless its queue is
    ``imbalance`` longer than the shortest; then the shortest queue first."""

    def initialize_state(self, imbalance: int = 4, **kwargs) -> None:
        self.imbalance = imbalance
        self.index = PrefixIndex()

    def _queue(self, replica) -> int:
        n = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if n is None else n

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        try:
            return self._rank(candidate_replicas, pending_request)
        except Exception:  # noqa: BLE001 - a router that raises leaves the request hanging
            log.exception("prefix routing failed; any replica will do")
            return [candidate_replicas]

    def _rank(self, candidate_replicas, pending_request):
        routed = pending_request.args[0] if pending_request is not None and pending_request.args else None
        text = getattr(routed, "prefix", None)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queues = {rid: self._queue(r) for rid, r in by_id.items()}
        shortest = min(queues.values())
        owner = None
        if text:
            owner, _ = self.index.match(prefix_keys(text), set(by_id))
        if owner is None or queues[owner] > shortest + self.imbalance:
            # the least loaded; ties broken by the text (no text: at random), so equal queues spread
            ties = sorted(rid for rid, q in queues.items() if q == shortest)
            owner = ties[zlib.crc32(text.encode()) % len(ties)] if text else random.choice(ties)
        rest = sorted((r for rid, r in by_id.items() if rid != owner), key=self._queue)
        return [[by_id[owner]], rest] if rest else [[by_id[owner]]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        routed = pending_request.args[0] if pending_request.args else None
        text = getattr(routed, "prefix", None)
        if text:
            self.index.insert(prefix_keys(text), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.unique_id)
