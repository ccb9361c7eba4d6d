"""Jobs over their account's max_concurrent_jobs wait in the agent's queue (state `queued`, the
reason in their log and state_reason), get their places in submission order per account, and
max_queued_jobs bounds how many may wait. The agent harness of test_agent: a real store, a fake
executor whose jobs run until the test releases them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from runner.job import JobRecord, JobState, Outcome
from runner.lifecycle.admission import Admission
from unit import test_agent
from unit.test_agent import ALICE, BOB, POLICY, Harness, job

harnesses = test_agent.harnesses  # test_agent's fixture: agents on the fake pipeline

WAITS = "account esm runs 3 of 3 jobs"  # esm's max_concurrent_jobs is 3


async def _three_running(h: Harness) -> list[str]:
    running = [(await h.submit(ALICE, job(f"r{i}"))).id for i in range(3)]
    for job_id in running:
        await h.wait_started(job_id)
    return running


def _reason(h: Harness, job_id: str) -> str | None:
    record = h.store.get_job(job_id)
    assert record is not None
    return record.state_reason


async def test_a_job_over_the_cap_waits_queued_saying_why_and_starts_when_one_ends(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=5)  # slots to spare: only the account's cap holds the job back
    running = await _three_running(h)

    record, decision = await h.agent.submit(ALICE, job("fourth"), h.workspace, submitter_uid=None)

    assert (record.state, decision.allowed, decision.waits) == (JobState.queued, True, WAITS)
    await h.wait(lambda: _reason(h, record.id) == WAITS, "the reason to be recorded")
    assert f"hpc-runner: waiting in the agent's queue: {WAITS} (max_concurrent_jobs)" in h.log_of(record.id)
    assert h.state(record.id) == JobState.queued and record.id not in h.executor.started

    h.executor.release(running[0])

    await h.wait_started(record.id)
    assert _reason(h, record.id) is None
    assert "hpc-runner: a place is free; the job starts" in h.log_of(record.id)


async def test_places_go_in_submission_order_within_the_account_and_other_accounts_go_on(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=10)
    running = await _three_running(h)
    waiting = [(await h.submit(ALICE, job(f"w{i}"))).id for i in range(3)]
    await h.wait(lambda: all(_reason(h, w) is not None for w in waiting), "the jobs to wait")
    assert [_reason(h, w) for w in waiting] == [
        WAITS, f"{WAITS}; 1 waits before it", f"{WAITS}; 2 wait before it"]

    ocean = await h.submit(BOB, job("ocean"))  # ocean has no cap: esm's line is not its own
    await h.wait_started(ocean.id)

    h.executor.release(running[1])
    await h.wait_started(waiting[0])
    assert [h.state(w) for w in waiting[1:]] == [JobState.queued, JobState.queued]
    await h.wait(lambda: _reason(h, waiting[1]) == WAITS, "the second to be next")

    h.executor.release(running[0])
    await h.wait_started(waiting[1])
    assert h.state(waiting[2]) == JobState.queued
    assert h.executor.started[-2:] == [waiting[0], waiting[1]]


async def test_past_max_queued_jobs_a_job_is_denied_with_the_reason(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=10)
    h.policy_path.write_text(POLICY.replace("max_concurrent_jobs = 3", "max_concurrent_jobs = 3\n"
                                            "max_queued_jobs = 1"))
    assert h.agent.reload_policy()
    await _three_running(h)
    waits = await h.submit(ALICE, job("waits"))

    denied, decision = await h.agent.submit(ALICE, job("denied"), h.workspace, submitter_uid=None)

    assert h.state(waits.id) == JobState.queued
    assert denied.state == JobState.denied
    assert decision.reasons == (f"grant 'esm-members': {WAITS}; 1 waits before it, and its waiting list is "
                                "full (max_queued_jobs = 1)",)
    assert "max_queued_jobs = 1" in h.log_of(denied.id)


async def test_a_raised_cap_on_reload_lets_waiting_jobs_start(harnesses: Callable[..., Harness]) -> None:
    h = harnesses(max_jobs=10)
    await _three_running(h)
    waiting = await h.submit(ALICE, job("waits"))
    await h.wait(lambda: _reason(h, waiting.id) == WAITS, "the job to wait")

    h.policy_path.write_text(POLICY.replace("max_concurrent_jobs = 3", "max_concurrent_jobs = 4"))
    assert h.agent.reload_policy()

    await h.wait_started(waiting.id)


async def test_cancelling_a_job_that_waits_for_a_place_ends_it_and_frees_its_place_in_line(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=10)
    running = await _three_running(h)
    first, second = [(await h.submit(ALICE, job(f"w{i}"))).id for i in range(2)]
    await h.wait(lambda: _reason(h, second) == f"{WAITS}; 1 waits before it", "both to wait")

    h.agent.cancel(ALICE, first)

    assert h.state(first) == JobState.cancelled
    await h.wait(lambda: _reason(h, second) == WAITS, "the second to be next")
    h.executor.release(running[2])
    await h.wait_started(second)
    assert first not in h.executor.started


async def test_a_ci_job_over_the_cap_waits_in_run_and_its_source_hears_why(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(max_jobs=10)
    running = await _three_running(h)
    admitted = await h.agent.admit(Admission("buildkite", "bk-1", ALICE, job("ci")))
    heard: list[JobRecord] = []

    async def sink(_offset: int, _data: bytes) -> None:
        pass

    run = asyncio.ensure_future(h.agent.run(admitted.job_id, sink=sink, cancel=asyncio.Event(),
                                            on_change=heard.append))
    try:
        await h.wait(lambda: any(r.state_reason == WAITS for r in heard), "the source to hear the reason")
        assert h.state(admitted.job_id) == JobState.queued
        h.executor.release(running[0])
        await h.wait_started(admitted.job_id)
        h.executor.release(admitted.job_id)
        ended = await asyncio.wait_for(run, 5)
    finally:
        run.cancel()
    assert ended.state == JobState.succeeded


async def test_jobs_left_waiting_by_a_stopped_agent_wait_again_in_their_order(
    harnesses: Callable[..., Harness],
) -> None:
    h = harnesses(start=False)  # a store as an agent that stopped abruptly left it
    spec = job().to_json()
    allowed = {"allowed": True, "account": "esm", "grant": "esm-members", "reasons": [],
               "workspace": str(h.workspace)}

    def left_behind(state: JobState) -> str:
        record = h.store.add_job(source="local", identity=ALICE.to_json(), spec=spec)
        h.store.record_decision(record.id, actor="local:user:alice", decision=allowed)
        if state != JobState.queued:
            h.store.set_slurm_id(record.id, "4242", "slurm")  # Slurm still runs these
            h.store.set_state(record.id, state)
        return record.id

    in_slurm = [left_behind(JobState.running) for _ in range(3)]
    first, second = left_behind(JobState.queued), left_behind(JobState.queued)

    h.agent.start()

    await h.wait(lambda: _reason(h, second) == f"{WAITS}; 1 waits before it", "both to wait again")
    assert _reason(h, first) == WAITS
    h.agent.driver.finish(in_slurm[0], Outcome("succeeded", 0, "exit status 0"))
    await h.wait_started(first)
    assert h.state(second) == JobState.queued
