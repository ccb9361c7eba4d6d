"""The work in flight of a source or the local queue (`runner.tasks`)."""

from __future__ import annotations

import asyncio

from runner.tasks import TaskSet, pause


async def test_a_task_set_waits_for_its_tasks_and_for_those_they_start_meanwhile() -> None:
    tasks = TaskSet()
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def child() -> None:
        await release.wait()
        finished.append("child")

    async def parent() -> None:
        tasks.spawn(child())
        started.set()
        finished.append("parent")

    tasks.spawn(parent())
    idle = asyncio.create_task(tasks.wait_idle())
    await started.wait()
    assert not idle.done()
    release.set()
    await idle
    assert finished == ["parent", "child"] and len(tasks) == 0


async def test_a_task_set_holds_a_failed_task_only_until_it_ends() -> None:
    tasks = TaskSet()

    async def fail() -> None:
        raise RuntimeError("boom")

    task = tasks.spawn(fail())
    await tasks.wait_idle()
    assert isinstance(task.exception(), RuntimeError) and len(tasks) == 0


async def test_cancel_all_cancels_every_task_and_waits_for_them() -> None:
    tasks = TaskSet()
    never = asyncio.Event()
    spawned = [tasks.spawn(never.wait()) for _ in range(3)]
    await tasks.cancel_all()
    assert all(task.cancelled() for task in spawned) and len(tasks) == 0


async def test_a_pause_ends_when_one_of_its_events_is_set() -> None:
    draining, lost = asyncio.Event(), asyncio.Event()
    waiting = asyncio.create_task(pause(3600.0, draining, lost))
    await asyncio.sleep(0)
    assert not waiting.done()
    lost.set()   # one is enough: the other stays unset
    await asyncio.wait_for(waiting, 10.0)
    assert not draining.is_set()


async def test_a_pause_with_an_event_already_set_ends_at_once() -> None:
    draining = asyncio.Event()
    draining.set()
    await asyncio.wait_for(pause(3600.0, draining), 10.0)


async def test_a_pause_nothing_cuts_short_lasts_its_time() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    await pause(0.05, asyncio.Event())
    await pause(0.05)
    assert loop.time() - began >= 0.09
