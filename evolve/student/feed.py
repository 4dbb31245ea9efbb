"""The training worker's side of the trainer feed (the TrainerFeed actor, actors/trainer_feed.py).

Continuous training meets the loop at step boundaries: a worker polls the
feed for what to train on (a new dataset version's shard, whether to write a
snapshot, to hold, or to stop), rank 0 announces each snapshot it writes. The
feed is reached by its actor name, so this module needs only Ray's client API."""

from __future__ import annotations

import time


class FeedClient:
    def __init__(self, name: str, rank: int) -> None:
        import ray

        self.actor, self.rank = ray.get_actor(name), rank
        self.wait_s = 0.0  # time spent asking the feed and swapping data: the loop's cost to training

    def poll(self, step: int, version: int | None, progress: dict | None = None, held: bool = False) -> dict:
        """{"version", "shard" (None if `version` is current), "snapshot", "hold", "stop"} for `step`.
        `progress` (rank 0): where training stands, for the loop's view of the trainer."""
        import ray

        t = time.perf_counter()
        try:
            return ray.get(self.actor.poll.remote(self.rank, step, version, progress, held))
        finally:
            self.wait_s += time.perf_counter() - t

    def snapshot(self, step: int, path: str, metrics: dict) -> None:
        import ray

        ray.get(self.actor.snapshot.remote(step, path, metrics))
