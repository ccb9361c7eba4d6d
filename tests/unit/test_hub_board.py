"""The dashboard's view of the hub's jobs (`HubBoard`) on a real hub: jobs submitted with tokens and
published by an agent over HTTP, shown to each viewer as the REST API shows them to a caller with
the same principals, cancelled only by those it lets cancel, and waits that end when jobs change."""

from __future__ import annotations

import asyncio

import pytest

from runner.gateway.board import HubBoard
from runner.web.board import ListQuery, NotCancellable, NotVisible, Resources, Viewer

from .test_hub_server import TOKEN_A, Hub, hub, issuer, start_hub  # noqa: F401  (fixtures)

SUBMITTER = Viewer("octocat", ("github:repo:CliMA/Oceananigans.jl",))
MEMBER = Viewer("someone", ("github:repo:CliMA/ClimaCore.jl",))
STRANGER = Viewer("stranger", ("github:repo:Ocean/Model.jl",))


def board_of(hub: Hub) -> HubBoard:  # noqa: F811
    return HubBoard(hub.server._jobs_thread, hub.server._wakeups)


async def running_job(hub: Hub) -> str:  # noqa: F811
    """A job of the Oceananigans repository, running in account `clima` whose members are ClimaCore's."""
    job_id = str((await hub.submit(cluster="hpc1"))["id"])
    assert await hub.lease(cluster="hpc1") is not None
    status, answer = await hub.publish(job_id, "running", account="clima", grant="clima-ci",
                                       members=("github:repo:CliMA/ClimaCore.jl",), slurm_job_id="4242",
                                       node_list="cn[01-02]")
    assert status == 200, answer
    return job_id


async def test_a_member_sees_the_job_and_its_log_but_only_the_submitter_cancels_it(hub: Hub) -> None:  # noqa: F811
    board = board_of(hub)
    job_id = await running_job(hub)
    await hub.append(job_id, 0, b"step 1\nstep 2\n")

    detail = await board.detail(MEMBER, job_id)
    card = detail.card
    assert (card.name, card.state, card.account, card.cluster, card.slurm_job_id) == (
        "unit", "running", "clima", "hpc1", "4242")
    assert (card.source.kind, card.source.label, card.source.url) == ("api", "github-actions", None)
    assert card.actor == "github:user:octocat" and card.state_reason is None
    assert detail.resources == Resources(nodes=1, time="10m", node_list="cn[01-02]")
    assert detail.image == "julia"
    assert (detail.grant, detail.log_length, detail.may_cancel) == ("clima-ci", 14, False)
    assert await board.read_log(MEMBER, job_id, 7, 100) == b"step 2\n"

    with pytest.raises(NotCancellable, match="only its submitter and its account's admins"):
        await board.cancel(MEMBER, job_id)
    for look in (board.detail(STRANGER, job_id), board.read_log(STRANGER, job_id, 0, 10),
                 board.cancel(STRANGER, job_id), board.detail(SUBMITTER, "0000000000000")):
        with pytest.raises(NotVisible):
            await look
    assert (await board.page(STRANGER, ListQuery())).cards == []

    assert (await board.detail(SUBMITTER, job_id)).may_cancel
    cancelled = await board.cancel(SUBMITTER, job_id)
    assert cancelled.card.state == "running"      # its agent is asked; the job ends when it has stopped
    assert (await hub.call("GET", f"/api/v1/agent/jobs/{job_id}", agent=TOKEN_A))[1]["cancel_requested"]


async def test_the_list_is_filtered_and_paged_newest_first_with_the_accounts_seen(hub: Hub) -> None:  # noqa: F811
    board = board_of(hub)
    running = await running_job(hub)
    waiting = [str((await hub.submit(cluster="hpc2"))["id"]) for _ in range(3)]

    page = await board.page(SUBMITTER, ListQuery(limit=2))
    assert [card.id for card in page.cards] == [waiting[2], waiting[1]] and page.next_before == waiting[1]
    assert list(page.accounts) == ["clima"]
    assert page.cards[0].state_reason == "waiting for an agent of hpc2"
    rest = await board.page(SUBMITTER, ListQuery(limit=2, before=page.next_before))
    assert [card.id for card in rest.cards] == [waiting[0], running] and rest.next_before is None

    for query in (ListQuery(states=("running",)), ListQuery(account="clima")):
        assert [card.id for card in (await board.page(SUBMITTER, query)).cards] == [running]
    assert len((await board.page(SUBMITTER, ListQuery(source="api", text="UNIT"))).cards) == 4
    assert (await board.page(SUBMITTER, ListQuery(source="github"))).cards == []
    # A member sees the account's job, not the submitter's others.
    assert [card.id for card in (await board.page(MEMBER, ListQuery())).cards] == [running]


async def test_waits_end_when_a_job_changes(hub: Hub) -> None:  # noqa: F811
    board = board_of(hub)
    job_id = await running_job(hub)

    log_wait = asyncio.create_task(board.wait_for_log(job_id, 0, 30))
    list_wait = asyncio.create_task(board.wait_for_jobs(30))
    await asyncio.sleep(0)      # both have taken their events
    assert not log_wait.done() and not list_wait.done()
    await hub.append(job_id, 0, b"more\n")
    await asyncio.wait_for(log_wait, 5)     # woken by the append, well before its 30 s
    assert not list_wait.done()             # a log is no change of the list
    await hub.publish(job_id, "succeeded", exit_status=0)
    await asyncio.wait_for(list_wait, 5)
    # Past the end of an ended job's log there is nothing to wait for.
    await asyncio.wait_for(board.wait_for_log(job_id, 5, 30), 5)
