"""The meeting point of the loop and a trainer that never stops.

The loop publishes dataset versions (one Ray Data shard per training worker);
the trainer's workers poll at step boundaries and swap their data in place,
without restarting; when the loop asks for weights trained n steps on a
version, rank 0 writes an EMA snapshot at the next step boundary after that,
which the loop samples, scores and judges while training goes on.

    feed = TrainerFeed.options(name="trainer-feed:<run>").remote(world_size)
    feed.publish.remote(version, shards)          # loop: new data
    feed.poll.remote(rank, step, have_version)    # worker: {"version", "stop", "snapshot", "shard"}
    feed.snapshot.remote(step, path, metrics)     # rank 0: new EMA weights on disk
    feed.wait_snapshot.remote(version, n)         # loop: >= n steps trained on that version
    feed.finish.remote()                          # loop: workers checkpoint and return

Every rank that polls at the same step gets the same answer (the first poll of
a step fixes it), so all workers switch data at one step boundary.

Lockstep (`lockstep_steps=n`, for controlled experiments): after n steps on a
version the trainer writes a snapshot whether or not the loop asked yet, then
holds (`poll(..., held=True)` returns only when a newer version is published or
the loop says stop). Every version then gets exactly n steps, however long the
loop takes, so two runs that differ only in their data train the same steps.
"""

from __future__ import annotations

import asyncio
import time

import ray


class Feed:
    def __init__(self, world_size: int, lockstep_steps: int | None = None) -> None:
        if lockstep_steps is not None and lockstep_steps < 1:
            raise ValueError(f"lockstep_steps must be >= 1, got {lockstep_steps}")
        self.world = world_size
        self.lockstep = lockstep_steps
        self.version: int | None = None
        self.shards: dict[int, list] = {}  # version -> one shard per rank (the last few versions)
        self.first_step: dict[int, int] = {}  # version -> step at which training on it began
        self.answers: dict[tuple[int, bool], dict] = {}  # (step, held) -> what every rank polling then is told
        self.stopping = False
        self.snapshots: list[dict] = []
        self.wanted: dict[int, int] = {}  # version -> steps on it after which the loop wants weights
        self.changed = asyncio.Condition()
        self.metrics: dict = {}

    # -- loop side ---------------------------------------------------------------
    def publish(self, version: int, shards: list) -> None:
        if len(shards) != self.world:
            raise ValueError(f"{len(shards)} shards for {self.world} training workers")
        self.version = version
        self.shards[version] = shards
        for v in [v for v in self.shards if v < version - 2]:
            del self.shards[v]

    def finish(self) -> None:
        self.stopping = True

    def _snapshot_after(self, version: int, min_steps: int) -> dict | None:
        """The first snapshot taken after >= min_steps of training on `version`, if any."""
        start = self.first_step.get(version)
        if start is None:
            return None
        return next((s for s in self.snapshots if s["step"] >= start + min_steps), None)

    async def wait_snapshot(self, version: int, min_steps: int) -> dict:
        """Wait for the first snapshot taken after >= min_steps of training on `version`."""
        self.wanted[version] = max(min_steps, self.wanted.get(version, 0))
        async with self.changed:
            await self.changed.wait_for(lambda: self._snapshot_after(version, min_steps))
        self.wanted.pop(version, None)
        return self._snapshot_after(version, min_steps)

    def status(self) -> dict:
        return {"version": self.version, "lockstep": self.lockstep, "first_step": dict(self.first_step), "stopping": self.stopping,
                "snapshots": list(self.snapshots), "metrics": dict(self.metrics)}

    # -- trainer side ------------------------------------------------------------
    async def poll(self, rank: int, step: int, have_version: int | None, metrics: dict | None = None,
                   held: bool = False) -> dict:
        """What rank `rank` trains on from `step`: {"version", "stop", "snapshot"
        (rank 0 writes one now), "hold" (lockstep: poll again with held=True
        after the snapshot), "shard" (only when it is not the version the rank
        already has)}. `metrics`: the trainer's progress, for status().
        `held=True` waits for a version newer than the one this step held on."""
        self.metrics.update(metrics or {})
        if held:
            before = self.answers[(step, False)]["version"]
            while not (self.stopping or self.version != before):
                await asyncio.sleep(0.05)  # publish()/finish() are plain calls: nothing to notify with
        ans = self.answers.get((step, held))
        if ans is None:
            if self.version is None:
                raise RuntimeError("the trainer polled before any dataset version was published")
            self.first_step.setdefault(self.version, step)
            # A snapshot is due for a waiting loop whose version has had its steps.
            due = any(v in self.first_step and self.first_step[v] + n <= step and
                      self._snapshot_after(v, n) is None for v, n in self.wanted.items())
            hold = (self.lockstep is not None and not self.stopping
                    and self.first_step[self.version] + self.lockstep <= step)
            ans = {"version": self.version, "stop": self.stopping, "snapshot": due or hold, "hold": hold}
            self.answers[(step, held)] = ans
            for key in [k for k in self.answers if k[0] < step - 1000]:
                del self.answers[key]
            async with self.changed:
                self.changed.notify_all()
        v = ans["version"]
        if v not in self.shards:  # a restarted worker asking about a step long past
            v = self.version
        return {**ans, "version": v, "shard": None if v == have_version else self.shards[v][rank]}

    async def snapshot(self, step: int, path: str, metrics: dict | None = None) -> None:
        self.snapshots = self.snapshots[-99:] + [{"step": step, "path": path, "time": time.time()}]
        self.metrics.update(metrics or {})
        async with self.changed:
            self.changed.notify_all()


# The actor: no CPU of its own (it only answers small calls), async so that
# wait_snapshot() can wait while polls and snapshots come in.
TrainerFeed = ray.remote(num_cpus=0)(Feed)
