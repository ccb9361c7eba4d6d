"""The tracker against a fake Slurm: one query per cycle, backoff on failures, nothing lost."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.executors.slurm.cli import SlurmUnavailable, SqueueRow
from runner.executors.slurm.tracker import (
    Finished,
    JobNote,
    NodesGiven,
    PendingInfo,
    QueryFailed,
    StateChanged,
    Tracker,
    TrackerEvent,
    backoff_delay,
)
from runner.job import Outcome


@dataclass
class FakeJob:
    state: str
    reason: str = "None"
    start: str | None = None
    exit_code: str = "0:0"
    time_limit: str = "10:00"
    node_list: str | None = None


class FakeSlurm:
    """squeue and scontrol over a dict of jobs; records every call; fails on demand."""

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.squeue_fails = False
        self.show_job_fails = False
        self.forgotten: set[str] = set()  # listed by neither squeue nor scontrol

    async def squeue(self, ids: Collection[str]) -> dict[str, SqueueRow]:
        self.calls.append(("squeue", tuple(ids)))
        if self.squeue_fails:
            raise SlurmUnavailable("squeue exited 1: Unable to contact slurm controller")
        return {i: SqueueRow(i, job.state, job.reason, job.start, f"hpcr-{i}", "", job.time_limit,
                             job.exit_code, False, job.node_list)
                for i, job in self.jobs.items() if i in ids and i not in self.forgotten}

    async def show_job(self, slurm_id: str) -> dict[str, str] | None:
        self.calls.append(("show_job", (slurm_id,)))
        if self.show_job_fails:
            raise SlurmUnavailable("scontrol show job timed out")
        job = self.jobs.get(slurm_id)
        if job is None or slurm_id in self.forgotten:
            return None
        return {"JobId": slurm_id, "JobState": job.state, "Reason": job.reason, "Requeue": "0",
                "ExitCode": job.exit_code, "TimeLimit": job.time_limit}


def tracker_for(slurm: FakeSlurm, *, interval: float = 5.0, max_delay: float = 300.0,
                jitter: float = 0.2) -> tuple[Tracker, list[TrackerEvent]]:
    tracker = Tracker(slurm, interval=interval, max_delay=max_delay, jitter=jitter, rng=random.Random(7))
    events: list[TrackerEvent] = []
    tracker.listen(events.append)
    return tracker, events


@pytest.mark.parametrize("count", [1, 10, 100])
async def test_one_squeue_call_per_cycle_whatever_the_number_of_jobs(count: int) -> None:
    slurm = FakeSlurm()
    tracker, _ = tracker_for(slurm)
    for n in range(count):
        slurm.jobs[str(1000 + n)] = FakeJob("PENDING" if n % 2 else "RUNNING", "Resources")
        tracker.track(str(1000 + n))
    for _ in range(3):
        await tracker.poll_once()
        assert tracker.last_cycle is not None and tracker.last_cycle.commands == 1
    assert slurm.calls == [("squeue", tuple(str(1000 + n) for n in range(count)))] * 3
    assert len(tracker.tracked) == count


async def test_jobs_that_end_cost_nothing_more_than_the_cycles_squeue(tmp_path: Path) -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)
    for n in range(5):
        slurm.jobs[str(n + 1)] = FakeJob("RUNNING")
        tracker.track(str(n + 1), tmp_path / f"status-{n + 1}")
    await tracker.poll_once()
    slurm.calls.clear()
    slurm.jobs["2"] = FakeJob("COMPLETED", exit_code="0:0")
    (tmp_path / "status-2").write_text("0\n")
    slurm.jobs["4"] = FakeJob("FAILED", "NonZeroExitCode", exit_code="3:0")  # no file: Slurm's code
    slurm.jobs["5"] = FakeJob("TIMEOUT", "TimeLimit", exit_code="0:15", time_limit="1:00")
    await tracker.poll_once()
    assert slurm.calls == [("squeue", ("1", "2", "3", "4", "5"))]
    assert tracker.last_cycle is not None and tracker.last_cycle.commands == 1
    done = {e.slurm_id: e.outcome for e in events if isinstance(e, Finished)}
    assert done == {"2": Outcome("succeeded", 0, "exit status 0"), "4": Outcome("failed", 3, "exit status 3"),
                    "5": Outcome("timed_out", 143, "walltime of 1:00 exceeded (TIMEOUT)")}
    slurm.calls.clear()
    await tracker.poll_once()
    assert slurm.calls == [("squeue", ("1", "3"))]


def test_backoff_grows_with_jitter_within_bounds() -> None:
    rng = random.Random(1)
    for failures in range(12):
        base = min(60.0, 2.0 * 2 ** failures)
        delays = [backoff_delay(2.0, failures, cap=60.0, jitter=0.25, rng=rng) for _ in range(200)]
        assert all(0.75 * base <= d <= base for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.1 * base  # jittered, not a fixed step


async def test_failed_queries_back_off_and_change_nothing(tmp_path: Path) -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm, interval=2.0, max_delay=30.0, jitter=0.2)
    slurm.jobs["7"] = FakeJob("RUNNING")
    slurm.jobs["8"] = FakeJob("PENDING", "Resources", "2026-11-26T10:00:00")
    tracker.track("7", tmp_path / "status-7")
    tracker.track("8")
    await tracker.poll_once()
    seen = list(events)
    slurm.squeue_fails = True
    # Meanwhile in Slurm both jobs end; a failed query must not notice anything.
    slurm.jobs["7"] = FakeJob("COMPLETED", exit_code="0:0")
    slurm.jobs["8"] = FakeJob("CANCELLED")
    for failures in range(1, 7):
        delay = await tracker.poll_once()
        base = min(30.0, 2.0 * 2 ** failures)
        assert 0.8 * base <= delay <= base, (failures, delay)
    assert sorted(tracker.tracked) == ["7", "8"]
    assert tracker.state_of("7") == "RUNNING" and tracker.state_of("8") == "PENDING"
    failed = events[len(seen):]
    assert all(isinstance(e, QueryFailed) for e in failed) and len(failed) == 6
    assert [e.failures for e in failed if isinstance(e, QueryFailed)] == [1, 2, 3, 4, 5, 6]
    # Slurm answers again: the news arrives, and the delay is the normal interval once more.
    slurm.squeue_fails = False
    (tmp_path / "status-7").write_text("0\n")
    assert await tracker.poll_once() <= 2.0
    done = {e.slurm_id: e.outcome.state for e in events if isinstance(e, Finished)}
    assert done == {"7": "succeeded", "8": "cancelled"}
    assert tracker.failures == 0 and tracker.tracked == []


async def test_a_failed_scontrol_leaves_its_job_as_it_was() -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)
    slurm.jobs["1"] = FakeJob("RUNNING")
    tracker.track("1")
    await tracker.poll_once()
    slurm.forgotten = {"1"}  # squeue no longer lists it, and scontrol does not answer
    slurm.show_job_fails = True
    await tracker.poll_once()
    assert tracker.state_of("1") == "RUNNING" and tracker.tracked == ["1"]
    assert not any(isinstance(e, Finished) for e in events)
    assert isinstance(events[-1], QueryFailed) and tracker.failures == 1
    slurm.show_job_fails = False
    await tracker.poll_once()
    assert isinstance(events[-1], Finished) and events[-1].outcome.state == "infra_failed"


async def test_a_job_squeue_no_longer_lists_is_confirmed_with_scontrol(tmp_path: Path) -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)
    for slurm_id in ("1", "2", "3"):
        slurm.jobs[slurm_id] = FakeJob("RUNNING")
        tracker.track(slurm_id, tmp_path / f"status-{slurm_id}")
    await tracker.poll_once()
    # 1: scontrol still has it; 2: gone, with an exit status; 3: gone without a trace.
    slurm.forgotten = {"2", "3"}
    slurm.calls.clear()
    (tmp_path / "status-2").write_text("4\n")
    await tracker.poll_once()
    assert slurm.calls == [("squeue", ("1", "2", "3")), ("show_job", ("2",)), ("show_job", ("3",))]
    done = {e.slurm_id: e.outcome for e in events if isinstance(e, Finished)}
    assert done["2"] == Outcome("failed", 4, "exit status 4; Slurm no longer knows job 2")
    assert done["3"].state == "infra_failed" and tracker.tracked == ["1"]


async def test_state_changes_pending_news_and_requeue_notes() -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)
    slurm.jobs["5"] = FakeJob("PENDING", "Priority")
    tracker.track("5")
    await tracker.poll_once()
    await tracker.poll_once()  # nothing new: no event
    slurm.jobs["5"] = FakeJob("PENDING", "Resources", "2026-11-26T10:00:00")
    await tracker.poll_once()
    slurm.jobs["5"] = FakeJob("RUNNING")
    await tracker.poll_once()
    slurm.jobs["5"] = FakeJob("PENDING", "BeginTime")  # requeued after a node failure
    await tracker.poll_once()
    assert events == [
        StateChanged("5", None, "PENDING", "pending"),
        PendingInfo("5", "Priority", None),
        PendingInfo("5", "Resources", "2026-11-26T10:00:00"),
        StateChanged("5", "PENDING", "RUNNING", "running"),
        StateChanged("5", "RUNNING", "PENDING", "pending"),
        JobNote("5", "hpc-runner: Slurm put the job back in the queue (reason: BeginTime); "
                     "it will start again from the top"),
        PendingInfo("5", "BeginTime", None),
    ]


async def test_the_nodes_a_job_was_given_are_said_once_and_again_when_they_change(tmp_path: Path) -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)
    slurm.jobs["6"] = FakeJob("PENDING", "Resources")
    slurm.jobs["7"] = FakeJob("PENDING", "Priority")
    tracker.track("6")
    tracker.track("7", tmp_path / "exit-status")
    await tracker.poll_once()
    slurm.jobs["6"] = FakeJob("RUNNING", node_list="cn[01-02]")
    await tracker.poll_once()
    await tracker.poll_once()  # the same nodes: nothing to say
    slurm.jobs["6"] = FakeJob("RUNNING", node_list="cn[03-04]")  # requeued and started elsewhere
    # Job 7 ran and ended between two cycles: where it ran comes before its end.
    slurm.jobs["7"] = FakeJob("COMPLETED", node_list="cn05")
    await tracker.poll_once()
    nodes = [event for event in events if isinstance(event, NodesGiven)]
    assert nodes == [NodesGiven("6", "cn[01-02]"), NodesGiven("6", "cn[03-04]"), NodesGiven("7", "cn05")]
    of_7 = [type(event).__name__ for event in events if getattr(event, "slurm_id", None) == "7"]
    assert of_7[-2:] == ["NodesGiven", "Finished"]


async def test_per_job_listeners_hear_only_their_job() -> None:
    slurm = FakeSlurm()
    tracker = Tracker(slurm)
    slurm.jobs["1"] = FakeJob("RUNNING")
    slurm.jobs["2"] = FakeJob("RUNNING")
    tracker.track("1")
    tracker.track("2")
    heard: list[TrackerEvent] = []
    unsubscribe = tracker.listen(heard.append, "2")
    await tracker.poll_once()
    assert heard == [StateChanged("2", None, "RUNNING", "running")]
    unsubscribe()
    slurm.jobs["2"] = FakeJob("CANCELLED")
    await tracker.poll_once()
    assert len(heard) == 1


async def test_a_failed_query_reaches_the_listeners_of_every_tracked_job() -> None:
    slurm = FakeSlurm()
    tracker = Tracker(slurm)
    heard: dict[str, list[TrackerEvent]] = {"1": [], "2": []}
    for slurm_id in heard:
        slurm.jobs[slurm_id] = FakeJob("RUNNING")
        tracker.track(slurm_id)
        tracker.listen(heard[slurm_id].append, slurm_id)
    slurm.squeue_fails = True
    await tracker.poll_once()
    assert [type(e) for e in heard["1"]] == [type(e) for e in heard["2"]] == [QueryFailed]


async def test_an_unexpected_error_in_a_cycle_backs_off_like_a_failed_query() -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm, interval=1.0, jitter=0.0)
    slurm.jobs["1"] = FakeJob("RUNNING")
    tracker.track("1")

    async def broken(ids: Collection[str]) -> dict[str, SqueueRow]:
        raise RuntimeError("a bug")

    slurm.squeue = broken  # type: ignore[method-assign]
    assert await tracker.poll_once() == 2.0
    assert tracker.tracked == ["1"] and isinstance(events[-1], QueryFailed)


async def test_a_broken_listener_does_not_stop_tracking() -> None:
    slurm = FakeSlurm()
    tracker, events = tracker_for(slurm)

    def broken(event: TrackerEvent) -> None:
        raise RuntimeError("bug")

    tracker.listen(broken)
    slurm.jobs["1"] = FakeJob("CANCELLED")
    tracker.track("1")
    await tracker.poll_once()
    assert isinstance(events[-1], Finished) and tracker.tracked == []


async def test_run_polls_until_every_job_has_ended() -> None:
    slurm = FakeSlurm()
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            slurm.squeue_fails = True
        if len(pauses) == 3:
            slurm.squeue_fails = False
            slurm.jobs["1"] = FakeJob("COMPLETED", exit_code="0:0")

    tracker = Tracker(slurm, interval=1.0, max_delay=8.0, jitter=0.0, sleep=sleep)
    slurm.jobs["1"] = FakeJob("RUNNING")
    tracker.track("1")
    await tracker.run()
    assert pauses == [1.0, 1.0, 2.0]
    assert [name for name, _ in slurm.calls] == ["squeue", "squeue", "squeue", "squeue"]


def test_settings_are_checked() -> None:
    for bad in ({"interval": 0.0}, {"interval": 5.0, "max_delay": 1.0}, {"jitter": 1.0}):
        with pytest.raises(ValueError):
            Tracker(FakeSlurm(), **bad)  # type: ignore[arg-type]
