"""The hub's job store: API jobs queued, leased per cluster, taken for good, cancelled, and their
logs held byte-exact through repeated, gapped and overlapping appends and a reopening."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.github_api import ManualClock

from runner.gateway.access import Access, access_of, caller_keys, member_keys, owner_keys
from runner.gateway.jobs_protocol import MAX_LOG_BYTES, MAX_NODE_LIST_CHARS, VIEW_FIELDS, parse_state_update
from runner.gateway.jobstore import (
    DB_FILENAME,
    MIGRATIONS,
    Conflict,
    JobNotFound,
    JobStore,
    ListFilter,
    LogFull,
    NewJob,
    NotHeld,
    page_query,
)
from runner.sqlitefile import StoreError, open_database

REPO = "github:repo:CliMA/Oceananigans.jl"
JOB = {"name": "unit", "image": "julia", "command": ["julia", "-e", "1+1"]}


def new_job(repository: str = "CliMA/Oceananigans.jl", *, cluster: str | None = "hpc1",
            token: str = "header.payload.signature", job: dict[str, Any] | None = None) -> NewJob:
    owner = repository.split("/")[0]
    principals = (f"github:org:{owner}", f"github:repo:{repository}", "github:user:octocat")
    return NewJob(job=job or dict(JOB), identity={"source": "github", "repository": repository},
                  principals=principals, owner_keys=owner_keys(principals), cluster=cluster,
                  repository=repository, commit="a" * 40, issuer="github", token=token)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "hub-state"


@pytest.fixture
def store(state_dir: Path, clock: ManualClock) -> Iterator[JobStore]:
    with JobStore.open(state_dir, clock=clock.time) as opened:
        yield opened


def taken(store: JobStore, agent: str = "login-a") -> str:
    """A new job, leased to `agent` and taken for good by publishing its first state."""
    job = store.submit(new_job())
    leased = store.lease(agent, "hpc1", 30)
    assert leased is not None and leased.id == job.id
    store.publish_state(leased.id, agent, parse_state_update({"state": "queued"}))
    return leased.id


def test_the_file_is_private_and_a_job_is_kept_as_submitted(store: JobStore, state_dir: Path,
                                                             clock: ManualClock) -> None:
    assert stat.S_IMODE((state_dir / DB_FILENAME).stat().st_mode) == 0o600
    job = {"name": "ü", "image": "julia", "env": {"Z": "1", "A": "2"}, "script": "echo\u2028hi"}
    stored = store.submit(new_job(job=job))
    again = store.get(stored.id)
    assert again is not None and again.job == job
    assert list(again.job["env"]) == ["Z", "A"]          # its own key order
    assert (again.state, again.created, again.issuer, again.origin) == ("queued", clock.now, "github", "api")
    assert again.view("https://hub.example.org")["url"] == f"https://hub.example.org/jobs/{stored.id}"
    assert "token" not in again.view("https://hub.example.org") and not hasattr(again, "token")


def test_agents_lease_the_oldest_job_of_their_cluster_or_of_none(store: JobStore) -> None:
    first = store.submit(new_job(cluster="hpc2"))
    second = store.submit(new_job(cluster=None))
    third = store.submit(new_job(cluster="hpc1"))
    leased = store.lease("login-a", "hpc1", 30)
    assert leased is not None and leased.id == second.id            # any cluster's, oldest first
    leased = store.lease("login-a", "hpc1", 30)
    assert leased is not None and (leased.id, leased.token, leased.attempt) == (third.id,
                                                                                "header.payload.signature", 1)
    assert store.lease("login-a", "hpc1", 30) is None               # hpc2's is not for hpc1
    leased = store.lease("login-b", "hpc2", 30)
    assert leased is not None and leased.id == first.id


def test_a_lease_that_runs_out_before_a_state_returns_the_job_and_a_state_keeps_it(
        store: JobStore, clock: ManualClock) -> None:
    job = store.submit(new_job())
    assert store.lease("login-a", "hpc1", 10) is not None
    assert store.next_expiry() == clock.now + 10
    clock.advance(10)
    again = store.lease("login-b", "hpc1", 10)
    assert again is not None and (again.id, again.attempt) == (job.id, 2)
    with pytest.raises(NotHeld):
        store.publish_state(job.id, "login-a", parse_state_update({"state": "pending"}))
    store.publish_state(job.id, "login-b", parse_state_update({"state": "pending"}))
    clock.advance(3600)
    assert store.lease("login-a", "hpc1", 10) is None               # login-b's for good
    assert store.next_expiry() is None


def test_a_release_returns_the_lease_at_once(store: JobStore) -> None:
    job = store.submit(new_job())
    assert store.lease("login-a", "hpc1", 60) is not None
    assert store.release(job.id, "login-b") is False
    assert store.release(job.id, "login-a") is True
    leased = store.lease("login-b", "hpc1", 60)
    assert leased is not None and leased.id == job.id


def test_states_are_recorded_with_their_fields_and_an_end_is_final(store: JobStore,
                                                                  clock: ManualClock) -> None:
    job_id = taken(store, "login-a")
    clock.advance(5)
    running = store.publish_state(job_id, "login-a", parse_state_update(
        {"state": "running", "account": "clima", "grant": "ci", "slurm_job_id": "4242",
         "admins": ["github:team:CliMA/core"]}))
    assert (running.state, running.account, running.grant, running.slurm_job_id) == ("running", "clima", "ci",
                                                                                      "4242")
    assert running.started == clock.now and running.ended is None
    clock.advance(5)
    ended = store.publish_state(job_id, "login-a", parse_state_update(
        {"state": "failed", "exit_status": 3, "reasons": ["exit status 3"]}))
    # Fields a publication leaves out keep their values.
    assert (ended.state, ended.exit_status, ended.reasons, ended.account) == ("failed", 3, ("exit status 3",),
                                                                              "clima")
    assert ended.ended == clock.now and ended.admins == ("github:team:CliMA/core",)
    assert store.publish_state(job_id, "login-a", parse_state_update({"state": "failed"})).exit_status == 3
    with pytest.raises(Conflict, match="already ended failed"):
        store.publish_state(job_id, "login-a", parse_state_update({"state": "running"}))


def test_a_queued_job_nobody_holds_is_cancelled_at_once(store: JobStore, clock: ManualClock) -> None:
    job = store.submit(new_job())
    cancelled = store.request_cancel(job.id)
    assert (cancelled.state, cancelled.cancel_requested, cancelled.ended) == ("cancelled", True, clock.now)
    assert store.lease("login-a", "hpc1", 10) is None


def test_a_held_job_is_only_flagged_and_a_lapsed_lease_then_ends_it(store: JobStore,
                                                                    clock: ManualClock) -> None:
    running = taken(store, "login-a")
    flagged = store.request_cancel(running)
    assert (flagged.state, flagged.cancel_requested) == ("queued", True)   # the agent ends it
    assert store.held(running, "login-a").cancel_requested

    leased = store.submit(new_job())
    assert store.lease("login-a", "hpc1", 10) is not None
    assert store.request_cancel(leased.id).state == "queued"
    clock.advance(10)
    assert store.lease("login-b", "hpc1", 10) is None                     # not handed out again
    job = store.get(leased.id)
    assert job is not None and job.state == "cancelled"


def test_log_appends_are_byte_exact_idempotent_and_refuse_gaps(store: JobStore) -> None:
    job_id = taken(store, "login-a")
    pieces = [b"line 1\n", b"\x00\xff binary \r\n", b"", "ünïcode\n".encode(), b"x" * 70_000]
    whole = b""
    for piece in pieces:
        assert store.append_log(job_id, "login-a", len(whole), piece) == len(whole) + len(piece)
        whole += piece
    # The same append again (its answer was lost) changes nothing.
    assert store.append_log(job_id, "login-a", 0, pieces[0]) == len(whole)
    # An append overlapping the end adds only its new tail.
    assert store.append_log(job_id, "login-a", len(whole) - 3, whole[-3:] + b"tail") == len(whole) + 4
    whole += b"tail"
    with pytest.raises(Conflict, match="gap") as gap:
        store.append_log(job_id, "login-a", len(whole) + 1, b"later")
    assert gap.value.length == len(whole)
    with pytest.raises(Conflict, match="differ"):
        store.append_log(job_id, "login-a", 0, b"LINE 1\n")
    with pytest.raises(NotHeld):
        store.append_log(job_id, "login-b", len(whole), b"not mine")
    with pytest.raises(JobNotFound):
        store.append_log("0000000000000", "login-a", 0, b"x")
    assert store.read_log(job_id, 0, 1 << 30) == whole
    for offset in (0, 1, 7, 8, 100, len(whole) - 1, len(whole), len(whole) + 10):
        for limit in (1, 5, 70_000):
            assert store.read_log(job_id, offset, limit) == whole[offset:offset + limit], (offset, limit)


def test_a_log_stops_at_its_cap(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import runner.gateway.jobstore as jobstore
    monkeypatch.setattr(jobstore, "MAX_LOG_BYTES", 10)
    job_id = taken(store, "login-a")
    assert store.append_log(job_id, "login-a", 0, b"0123456789") == 10
    with pytest.raises(LogFull, match="10 bytes"):
        store.append_log(job_id, "login-a", 10, b"!")
    assert MAX_LOG_BYTES == 1024 ** 3


def test_jobs_and_logs_survive_a_reopening(state_dir: Path, clock: ManualClock) -> None:
    with JobStore.open(state_dir, clock=clock.time) as store:
        job_id = taken(store, "login-a")
        store.append_log(job_id, "login-a", 0, b"before the restart\n")
        waiting = store.submit(new_job()).id
    with JobStore.open(state_dir, clock=clock.time) as store:
        assert store.append_log(job_id, "login-a", 19, b"after\n") == 25
        assert store.read_log(job_id, 0, 100) == b"before the restart\nafter\n"
        leased = store.lease("login-b", "hpc1", 10)
        assert leased is not None and leased.id == waiting
        assert store.schema_version() == len(MIGRATIONS)   # the current schema, not migrated again


def test_callers_see_the_jobs_of_their_repository_and_of_the_accounts_they_administer(
        store: JobStore) -> None:
    ours = [store.submit(new_job("CliMA/Oceananigans.jl")).id for _ in range(3)]
    theirs = store.submit(new_job("Other/Thing")).id
    keys = caller_keys(["github:org:clima", "github:repo:clima/oceananigans.jl", "github:user:someone"])
    assert [job.id for job in store.visible(keys, limit=10)] == ours[::-1]     # newest first
    assert [job.id for job in store.visible(keys, limit=2)] == ours[:0:-1]
    assert [job.id for job in store.visible(keys, limit=2, before=ours[1])] == [ours[0]]
    assert store.visible(caller_keys(["github:repo:CliMA/ClimaCore.jl"]), limit=10) == []

    # The agent publishes the account's admins with its decision: they see the job too.
    leased = [store.lease("login-a", "hpc1", 30) for _ in range(4)][-1]     # oldest first: theirs last
    assert leased is not None and leased.id == theirs
    store.publish_state(theirs, "login-a", parse_state_update(
        {"state": "denied", "admins": ["github:repo:CliMA/*"], "reasons": ["no grant"]}))
    assert [job.id for job in store.visible(keys, limit=10)] == [theirs, *ours[::-1]]
    with pytest.raises(JobNotFound):
        store.visible(keys, limit=10, before="0000000000000")


def test_an_agent_registers_its_other_jobs_once_and_owns_them(store: JobStore, clock: ManualClock) -> None:
    principals = ("buildkite:org:clima", "buildkite:pipeline:clima/ocean")
    identity = {"source": "buildkite", "organization": "clima", "pipeline": "ocean"}
    new = NewJob(job=dict(JOB), identity=identity, principals=principals, owner_keys=owner_keys(principals),
                 cluster="hpc1", repository=None, commit=None)
    job, fresh = store.register("01abcdefghjkm", "login-a", new, created=clock.now - 60)
    assert fresh and (job.origin, job.lease_agent, job.accepted, job.created) == ("agent", "login-a", True,
                                                                                  clock.now - 60)
    assert store.register("01abcdefghjkm", "login-a", new) == (job, False)
    with pytest.raises(Conflict):
        store.register("01abcdefghjkm", "login-b", new)
    assert store.lease("login-b", "hpc1", 10) is None                       # never leased out
    assert store.append_log(job.id, "login-a", 0, b"ok\n") == 3
    assert store.visible(caller_keys(["buildkite:pipeline:clima/ocean"]), limit=5)[0].id == job.id


def test_an_api_job_needs_its_token_and_issuer(store: JobStore) -> None:
    with pytest.raises(StoreError, match="token"):
        store.submit(NewJob(job=dict(JOB), identity={}, principals=(), owner_keys=(), cluster=None,
                            repository=None, commit=None))


# --- members, and what the pages list ---

def test_members_of_the_account_see_a_job_and_only_its_owners_and_admins_may_cancel_it(
        store: JobStore) -> None:
    job_id = taken(store)
    store.publish_state(job_id, "login-a", parse_state_update(
        {"state": "running", "account": "clima", "admins": ["github:team:CliMA/leads"],
         "members": ["github:repo:CliMA/*", "github:team:CliMA/ocean"], "state_reason": None}))
    job = store.get(job_id)
    assert job is not None and job.members == ("github:repo:CliMA/*", "github:team:CliMA/ocean")
    member = caller_keys(["github:org:CliMA", "github:repo:CliMA/ClimaCore.jl"])
    assert access_of(job.access, member) is Access.SEE
    assert access_of(job.access, caller_keys([REPO])) is Access.CANCEL
    assert access_of(job.access, caller_keys(["github:team:clima/Leads"])) is Access.CANCEL
    assert access_of(job.access, caller_keys(["github:repo:Other/Thing"])) is Access.NONE
    assert [seen.id for seen in store.visible(member, limit=10)] == [job_id]
    # A later publication names the members anew: those no longer named no longer see the job.
    store.publish_state(job_id, "login-a", parse_state_update({"state": "running", "members": []}))
    assert store.visible(member, limit=10) == []
    with pytest.raises(ValueError, match="members: "):
        member_keys(["github:account:x"])


def test_a_job_keeps_its_name_source_actor_and_link_and_why_it_waits(store: JobStore) -> None:
    api = store.submit(new_job())
    assert (api.name, api.source, api.actor, api.source_label, api.source_url) == (
        "unit", "api", "github:org:CliMA", "github", None)
    identity = {"source": "github", "repository": "CliMA/X.jl", "actor": "octocat",
                "ref": "refs/pull/12/head"}
    registered = NewJob(job=dict(JOB, name="docs"), identity=identity, principals=("github:repo:CliMA/X.jl",),
                        owner_keys=("github:repo:clima/x.jl",), cluster="hpc1", repository="CliMA/X.jl",
                        commit=None, source="github", source_label="CliMA/X.jl#12",
                        source_url="https://github.com/CliMA/X.jl/pull/12")
    job, _ = store.register("01abcdefghjkm", "login-a", registered)
    assert (job.name, job.source, job.actor, job.source_label, job.source_url) == (
        "docs", "github", "github:user:octocat", "CliMA/X.jl#12", "https://github.com/CliMA/X.jl/pull/12")
    store.publish_state(job.id, "login-a", parse_state_update(
        {"state": "pending", "state_reason": "queued in Slurm", "slurm_job_id": "42"}))
    assert store.get(job.id).state_reason == "queued in Slurm"   # type: ignore[union-attr]
    store.publish_state(job.id, "login-a", parse_state_update(
        {"state": "pending", "state_reason": "Priority"}))
    store.publish_state(job.id, "login-a", parse_state_update(
        {"state": "running", "state_reason": None, "node_list": "cn[01-04,07]"}))
    held = store.get(job.id)
    assert held is not None and (held.state, held.state_reason, held.node_list, held.slurm_job_id) == (
        "running", None, "cn[01-04,07]", "42")
    with pytest.raises(ValueError, match="node_list"):
        parse_state_update({"state": "running", "node_list": "cn" * (MAX_NODE_LIST_CHARS // 2 + 1)})
    with pytest.raises(ValueError, match="node_list"):
        parse_state_update({"state": "running", "node_list": "cn01\ncn02"})
    # The REST view stays as it was.
    assert set(store.get(job.id).view("https://hub.example.org")) == set(VIEW_FIELDS)  # type: ignore[union-attr]


def test_a_store_of_schema_2_keeps_its_jobs_visible_with_their_list_columns(state_dir: Path) -> None:
    conn = open_database(state_dir / DB_FILENAME, MIGRATIONS[:2], what="hub job store", holds="jobs")
    identity = '{"actor":"octocat","repository":"CliMA/X.jl","source":"github"}'
    conn.execute("INSERT INTO jobs (seq, id, job, identity, principals, origin, issuer, token, cluster,"
                 " repository, state, account, admins, created)"
                 " VALUES (1, '01abcdefghjkm', ?, ?, ?, 'api', 'gha', 't', 'hpc1', 'CliMA/X.jl', 'running',"
                 " 'clima', '[\"github:team:CliMA/leads\"]', 5)",
                 ('{"name":"unit","image":"julia","resources":{"nodes":2}}', identity,
                  '["github:repo:CliMA/X.jl","github:user:octocat"]'))
    conn.execute("INSERT INTO jobs (seq, id, job, identity, principals, origin, cluster, state, created,"
                 " lease_agent) VALUES (2, '01abcdefghjkn', ?, ?, '[\"buildkite:org:clima\"]', 'agent',"
                 " 'hpc1', 'queued', 6, 'login-a')",
                 ('{"name":"bk","image":"julia"}',
                  '{"organization":"clima","pipeline":"ocean","source":"buildkite"}'))
    conn.executemany("INSERT INTO job_access (key, job_seq, role) VALUES (?, ?, ?)",
                     [("github:repo:clima/x.jl", 1, "owner"), ("github:team:clima/leads", 1, "admin"),
                      ("buildkite:pipeline:clima/ocean", 2, "owner")])
    conn.commit()
    conn.close()

    with JobStore.open(state_dir) as store:
        assert store.schema_version() == len(MIGRATIONS)
        first, second = store.get("01abcdefghjkm"), store.get("01abcdefghjkn")
        assert first is not None and second is not None
        assert (first.name, first.source, first.actor, first.source_label) == (
            "unit", "api", "github:user:octocat", "gha")
        assert (second.name, second.source, second.actor, second.source_label) == (
            "bk", "buildkite", "buildkite:pipeline:clima/ocean", "clima/ocean")
        assert access_of(first.access, caller_keys(["github:team:CliMA/leads"])) is Access.CANCEL
        own = caller_keys(["github:repo:CliMA/X.jl"])
        assert [job.id for job in store.visible(own, limit=5)] == [first.id]
        assert [row["id"] for row in store.page(caller_keys(["buildkite:pipeline:clima/ocean"]), ListFilter(),
                                                limit=5)] == [second.id]
        # The rebuilt access table takes the new role.
        store.publish_state(second.id, "login-a", parse_state_update(
            {"state": "running", "members": ["github:team:CliMA/ocean"]}))
        assert store.visible(caller_keys(["github:team:CliMA/ocean"]), limit=5)[0].id == second.id


# 10 000 jobs: one in ten of repository B, states, accounts and sources in turn.
MANY = 10_000
_STATES = ("queued", "running", "succeeded", "failed")


def _many(i: int) -> dict[str, Any]:
    return {"id": f"01m{i:010d}", "repo": "b" if i % 10 == 0 else "a", "state": _STATES[i % 4],
            "account": f"acct{i % 3}", "source": "github" if i % 2 else "api", "name": f"Job-{i}"}


@pytest.fixture(scope="module")
def many_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state_dir = tmp_path_factory.mktemp("many") / "hub-state"
    with JobStore.open(state_dir):
        pass
    conn = sqlite3.connect(state_dir / DB_FILENAME)
    with conn:
        for i in range(1, MANY + 1):
            job = _many(i)
            conn.execute(
                "INSERT INTO jobs (seq, id, job, identity, principals, origin, cluster, repository, state,"
                " account, created, name, source, actor)"
                " VALUES (?, ?, '{}', '{}', '[]', 'api', 'hpc1', ?, ?, ?, ?, ?, ?, ?)",
                (i, job["id"], f"CliMA/{job['repo'].upper()}", job["state"], job["account"], i, job["name"],
                 job["source"], f"github:user:u{i % 7}"))
            conn.execute("INSERT INTO job_access (key, job_seq, role) VALUES (?, ?, 'owner')",
                         (f"github:repo:clima/{job['repo']}", i))
    conn.close()
    return state_dir


def _walk(store: JobStore, keys: tuple[str, ...], where: ListFilter, limit: int = 50) -> list[str]:
    """Every page from the newest on, each starting after the last id of the one before."""
    found: list[str] = []
    before = None
    while True:
        rows = store.page(keys, where, limit=limit, before=before)
        found += [row["id"] for row in rows]
        if len(rows) < limit:
            return found
        before = rows[-1]["id"]


def test_pages_of_10000_jobs_are_filtered_and_cut_newest_first(many_dir: Path) -> None:
    b = caller_keys(["github:repo:CliMA/B"])
    expected = [_many(i)["id"] for i in range(MANY, 0, -1) if _many(i)["repo"] == "b"]
    with JobStore.open(many_dir) as store:
        assert _walk(store, b, ListFilter()) == expected
        where = ListFilter(states=("running", "failed"), account="acct1", source="github")
        assert _walk(store, caller_keys(["github:repo:CliMA/A"]), where, limit=37) == [
            _many(i)["id"] for i in range(MANY, 0, -1) if _many(i)["repo"] == "a"
            and _many(i)["state"] in where.states and _many(i)["account"] == "acct1"
            and _many(i)["source"] == "github"]
        # The text is looked for in the name, id, actor and repository, without regard to case.
        assert _walk(store, b, ListFilter(text="job-999")) == ["01m0000009990"]
        assert len(_walk(store, b, ListFilter(text="clima/b"))) == MANY // 10
        assert _walk(store, b, ListFilter(text="%")) == [] and _walk(store, b, ListFilter(text="_")) == []
        assert store.page(caller_keys(["github:repo:CliMA/C"]), ListFilter(), limit=50) == []
        assert store.visible_accounts(b) == ["acct0", "acct1", "acct2"]


@pytest.mark.parametrize("where", [ListFilter(), ListFilter(states=("running",)), ListFilter(account="acct1"),
                                   ListFilter(source="api", text="job")])
def test_a_page_is_read_through_indexes_not_by_scanning_the_jobs(many_dir: Path, where: ListFilter) -> None:
    sql, params = page_query(caller_keys(["github:repo:CliMA/A"]), where, upper=2**63 - 1, limit=50)
    conn = sqlite3.connect(many_dir / DB_FILENAME)
    try:
        plan = [str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    finally:
        conn.close()
    assert any(step.startswith("SEARCH jobs USING") for step in plan), plan
    assert any("job_access USING PRIMARY KEY (key=?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN") for step in plan), plan
