"""Heartbeats: a worker that stops answering is marked dead, and comes back when it answers."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.clients import WorkerGone
from pdserve.router.health import WorkerHealth
from pdserve.router.policy import WorkerLoad


def test_hung_then_dead_then_restarted_worker():
    async def scenario():
        load = WorkerLoad("w")
        deaths: list[str] = []
        revived: list[str] = []
        health = WorkerHealth({"w": load}, interval_s=0.01, timeout_s=0.05,
                              on_death=lambda wid, why: deaths.append(why),
                              on_revival=revived.append)
        mode = {"now": "ok"}
        seen = []

        async def ping():
            if mode["now"] == "hang":
                await asyncio.sleep(10)
            if mode["now"] == "gone":
                raise WorkerGone("actor died")
            return {"free": 7}

        task = asyncio.create_task(health.watch("w", ping, lambda wid, s: seen.append(s)))
        await asyncio.sleep(0.05)
        assert load.healthy and seen and not deaths
        mode["now"] = "hang"
        dead = health["w"].dead
        await asyncio.wait_for(dead.wait(), 1.0)
        assert not load.healthy and "no heartbeat" in deaths[0]
        assert not health["w"].alive.is_set()
        mode["now"] = "gone"  # still dead: no second death is reported
        await asyncio.sleep(0.2)
        assert len(deaths) == 1 and health["w"].deaths == 1
        mode["now"] = "ok"  # restarted: back in the pool, with a fresh dead event
        await asyncio.wait_for(health["w"].alive.wait(), 1.0)
        assert load.healthy and revived == ["w"] and not health["w"].dead.is_set()
        mode["now"] = "gone"
        await asyncio.wait_for(health["w"].dead.wait(), 1.0)
        assert "actor died" in deaths[1] and health["w"].deaths == 2
        task.cancel()

    asyncio.run(scenario())


def test_config_is_validated():
    with pytest.raises(ValueError):
        WorkerHealth({}, interval_s=0, timeout_s=1)


def test_a_new_incarnation_in_a_heartbeat_is_a_restart():
    """Killed and back between two heartbeats: no beat was missed, but it is another
    process, and whatever depended on the old one must be retried."""
    from dataclasses import dataclass

    @dataclass
    class Stats:
        incarnation: str

    async def scenario():
        load = WorkerLoad("w")
        deaths: list[str] = []
        health = WorkerHealth({"w": load}, interval_s=0.01, timeout_s=0.5,
                              on_death=lambda wid, why: deaths.append(why))
        answer = {"now": Stats("a" * 32)}

        async def ping():
            return answer["now"]

        task = asyncio.create_task(health.watch("w", ping))
        await asyncio.sleep(0.05)
        assert not deaths and health["w"].incarnation == "a" * 32
        answer["now"] = Stats("b" * 32)
        await asyncio.sleep(0.05)
        assert len(deaths) == 1 and "restarted" in deaths[0]
        assert load.healthy and health["w"].alive.is_set() and health["w"].deaths == 1
        task.cancel()

    asyncio.run(scenario())
