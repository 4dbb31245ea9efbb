"""The trainer feed's rules, on the plain class (no Ray): what each rank is
told at a step boundary, when a snapshot is due, and when the loop wakes."""

from __future__ import annotations

import asyncio

import pytest

from actors.trainer_feed import Feed


def run(coro):
    return asyncio.run(coro)


def test_poll_needs_a_version_and_shards_match_workers():
    f = Feed(world_size=2)
    with pytest.raises(RuntimeError, match="before any dataset version"):
        run(f.poll(0, 0, None))
    with pytest.raises(ValueError, match="3 shards for 2 training workers"):
        f.publish(0, ["a", "b", "c"])


def test_all_ranks_switch_at_the_same_step_and_get_their_own_shard():
    async def go():
        f = Feed(world_size=2)
        f.publish(0, ["v0-r0", "v0-r1"])
        a0 = await f.poll(0, 0, None)
        f.publish(1, ["v1-r0", "v1-r1"])  # arrives between the two ranks' polls of step 0
        a1 = await f.poll(1, 0, None)
        assert (a0["version"], a0["shard"]) == (0, "v0-r0")
        assert (a1["version"], a1["shard"]) == (0, "v0-r1")  # same step, same version
        b0 = await f.poll(0, 10, 0)
        b1 = await f.poll(1, 10, 0)
        assert (b0["shard"], b1["shard"]) == ("v1-r0", "v1-r1")
        c0 = await f.poll(0, 20, 1)
        assert c0["version"] == 1 and c0["shard"] is None  # nothing to reload
        assert f.first_step == {0: 0, 1: 10}
    run(go())


def test_snapshot_is_asked_for_after_enough_steps_and_wakes_the_loop():
    async def go():
        f = Feed(world_size=1)
        f.publish(3, ["s"])
        await f.poll(0, 100, None)  # training on v3 began at step 100
        waiter = asyncio.create_task(f.wait_snapshot(3, 20))
        await asyncio.sleep(0)
        assert (await f.poll(0, 110, 3))["snapshot"] is False
        ans = await f.poll(0, 120, 3)
        assert ans["snapshot"] is True and not waiter.done()
        await f.snapshot(120, "/snap/step_0000120", {"loss": 0.1})
        snap = await asyncio.wait_for(waiter, 1)
        assert snap["step"] == 120 and snap["path"].endswith("0000120")
        assert (await f.poll(0, 130, 3))["snapshot"] is False  # nobody waits any more
        assert f.status()["metrics"]["loss"] == 0.1
    run(go())


def test_stop_reaches_every_rank_at_one_step():
    async def go():
        f = Feed(world_size=2)
        f.publish(0, ["a", "b"])
        assert not (await f.poll(0, 0, None))["stop"]
        await f.poll(1, 0, None)
        f.finish()
        assert (await f.poll(0, 10, 0))["stop"] and (await f.poll(1, 10, 0))["stop"]
    run(go())


def test_a_restarted_worker_gets_the_current_data_for_a_forgotten_version():
    async def go():
        f = Feed(world_size=1)
        f.publish(0, ["v0"])
        await f.poll(0, 0, None)
        for v in (1, 2, 3, 4):
            f.publish(v, [f"v{v}"])
        ans = await f.poll(0, 0, None)  # step 0 was v0, whose shards are gone
        assert ans["version"] == 4 and ans["shard"] == "v4"
    run(go())


def test_lockstep_snapshots_after_n_steps_and_holds_until_the_next_version():
    async def go():
        f = Feed(world_size=2, lockstep_steps=20)
        f.publish(0, ["a0", "b0"])
        for step in (0, 10):
            assert not (await f.poll(0, step, None if step == 0 else 0))["hold"]
            await f.poll(1, step, None if step == 0 else 0)
        a0 = await f.poll(0, 20, 0)
        assert a0["snapshot"] and a0["hold"]  # nobody asked for it: lockstep writes it anyway
        assert (await f.poll(1, 20, 0))["hold"]
        held = [asyncio.create_task(f.poll(r, 20, 0, held=True)) for r in (0, 1)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in held)  # the loop has not published v1 yet
        f.publish(1, ["a1", "b1"])
        got = await asyncio.wait_for(asyncio.gather(*held), 2)
        assert [g["shard"] for g in got] == ["a1", "b1"] and not got[0]["hold"]
        assert f.first_step == {0: 0, 1: 20}  # v1 gets its 20 steps from step 20
        late = asyncio.create_task(f.poll(0, 40, 1))
        assert (await late)["hold"]
        waiting = asyncio.create_task(f.poll(0, 40, 1, held=True))
        await asyncio.sleep(0.1)
        f.finish()  # stop releases a held trainer
        assert (await asyncio.wait_for(waiting, 2))["stop"]
    run(go())


def test_lockstep_needs_steps_on_poll_boundaries():
    from evolve.config import TrainConfig

    with pytest.raises(ValueError, match="multiple of poll_every"):
        TrainConfig(lockstep=True, steps_per_round=25, poll_every=10)
    with pytest.raises(ValueError, match="lockstep_steps must be >= 1"):
        Feed(world_size=1, lockstep_steps=0)
