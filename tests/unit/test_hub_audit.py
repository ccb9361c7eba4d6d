"""The hub's audit trail (`GET /api/v1/audit`, `hpc-runner remote audit`), through the real hub
server and its SQLite job store: tokens minted by the OIDC issuer emulator and checked by the real
verifier, jobs submitted through the API and registered by an agent over its agent token, and the
trail read back as the JSON lines of `hpc-runner audit --json`, by an account's admins only."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.oidc_issuer import COMMIT, OidcIssuerEmulator

from runner.auditlines import KEYS, json_line, rfc3339, text_line
from runner.gateway import jobs_protocol as protocol
from runner.gateway.access import caller_keys
from runner.gateway.board import HubBoard
from runner.gateway.callers import authenticator
from runner.gateway.jobstore import DB_FILENAME, MIGRATIONS, JobStore
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.identity import Identity
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier
from runner.sqlitefile import open_database
from runner.web.board import Viewer
from unit.test_hub_jobstore import new_job
from unit.test_hub_server import AUDIENCE, JOB, PUBLIC_URL, TOKEN_A, TOKENS, Hub

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBMITTER = "Ocean/Model.jl"          # owns the API job
OCEAN_ADMINS = ("github:repo:Ocean/admin-tools",)
OCEAN_MEMBERS = ("github:repo:Ocean/Member.jl",)
SEA_ADMINS = ("github:repo:Sea/admin-tools",)
LOCAL_JOB = "01jz0a1b2c3d4"
START = 1_796_000_000.0               # the hub's clock at the first entry (December 2026)


@dataclass
class Trail:
    """The hub, its clock, and the jobs of `ocean_and_sea`."""

    hub: Hub
    clock: list[float]
    api_job: str = ""
    sea_job: str = ""

    def tick(self, seconds: float = 60.0) -> None:
        self.clock[0] += seconds

    async def read(self, token: str, query: str = "") -> tuple[int, str, list[dict[str, Any]], Any]:
        """GET the trail: its status, content type, entries (parsed lines), and its error (or None)."""
        async with self.hub.http.get(f"{self.hub.url}{protocol.AUDIT_PATH}{query}",
                                     headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.read()
            if response.status != 200:
                return response.status, response.content_type, [], json.loads(body)
            text = body.decode()
            assert text == "" or text.endswith("\n")
            entries = [json.loads(line) for line in text.splitlines()]
            return response.status, response.content_type, entries, None


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuerEmulator]:
    async with OidcIssuerEmulator() as emulator:
        yield emulator


@pytest.fixture
async def trail(tmp_path: Path, issuer: OidcIssuerEmulator,
                http: aiohttp.ClientSession) -> AsyncIterator[Trail]:
    clock = [START]
    verifier = TokenVerifier([OidcIssuer(name="github-actions", issuer=issuer.url, audience=AUDIENCE,
                                         kind="github")])
    settings = JobsApiSettings(public_url=PUBLIC_URL, authenticate=authenticator(verifier))
    server = GatewayServer(state_dir=tmp_path / "hub-state", webhook_secret=None, tokens=TOKENS,
                           jobs_api=settings, clock=lambda: clock[0])
    await server.start("127.0.0.1", 0)
    try:
        yield Trail(Hub(server, f"http://127.0.0.1:{server.port}", issuer, http), clock)
    finally:
        await server.close()


async def ocean_and_sea(trail: Trail) -> Trail:
    """Account ocean: an API job run and cancelled by an admin, and a local-queue job registered
    and run by the agent; account sea: an API job of another repository."""
    hub = trail.hub
    trail.api_job = (await hub.submit(token=hub.token(SUBMITTER, actor="erin"), cluster="hpc1"))["id"]
    trail.tick()
    leased = await hub.lease(cluster="hpc1")
    assert leased is not None and leased["id"] == trail.api_job
    assert (await hub.publish(trail.api_job, "running", account="ocean", grant="ocean-ci",
                              admins=OCEAN_ADMINS,
                              members=OCEAN_MEMBERS, slurm_job_id="4241"))[0] == 200
    trail.tick()
    body = protocol.registration_body(JOB, Identity(source="local", user="alice", groups=("ocean",)), "hpc1",
                                      commit=COMMIT, source="local")
    status, answer, _ = await hub.call("PUT", protocol.agent_job_path(LOCAL_JOB), agent=TOKEN_A, body=body)
    assert status == 201, answer
    assert (await hub.publish(LOCAL_JOB, "pending", account="ocean", grant="ocean-local", admins=OCEAN_ADMINS,
                              slurm_job_id="4242"))[0] == 200
    trail.tick()
    assert (await hub.publish(LOCAL_JOB, "succeeded", exit_status=0))[0] == 200
    status, _, _ = await hub.call("DELETE", f"/api/v1/jobs/{trail.api_job}",
                                  token=hub.token("Ocean/admin-tools", actor="olga"))
    assert status == 202
    assert (await hub.publish(trail.api_job, "cancelled", exit_status=143))[0] == 200
    trail.tick()
    trail.sea_job = (await hub.submit(token=hub.token("Sea/Other.jl", actor="sam"), cluster="hpc1"))["id"]
    assert await hub.lease(cluster="hpc1") is not None
    assert (await hub.publish(trail.sea_job, "failed", exit_status=1, account="sea", grant="sea-ci",
                              admins=SEA_ADMINS))[0] == 200
    return trail


def admin(trail: Trail, account: str = "ocean") -> str:
    return trail.hub.token("Ocean/admin-tools" if account == "ocean" else "Sea/admin-tools", actor="olga")


async def test_an_accounts_admin_reads_the_trail_of_its_api_and_agent_jobs_as_audit_json_lines(
        trail: Trail) -> None:
    await ocean_and_sea(trail)
    status, content_type, entries, _ = await trail.read(admin(trail), "?account=ocean")
    assert (status, content_type) == (200, "application/x-ndjson")
    assert all(list(item) == list(KEYS) for item in entries)
    assert [item["seq"] for item in entries] == sorted(item["seq"] for item in entries)  # newest last
    assert all(item["time"].endswith("Z") for item in entries)

    api = [item for item in entries if item["job_id"] == trail.api_job]
    assert [(item["action"], item["actor"]) for item in api] == [
        ("submitted", "github:user:erin"), ("accepted", "agent:login-a"), ("state", "agent:login-a"),
        ("cancel", "github:user:olga"), ("state", "agent:login-a"), ("final_status", "agent:login-a")]
    assert api[0]["time"] == rfc3339(START)
    assert api[2]["detail"] == {"from": "queued", "to": "running", "slurm_id": "4241", "exit_status": None,
                                     "account": "ocean", "grant": "ocean-ci"}
    assert api[5]["detail"] == {"state": "cancelled", "exit_status": 143, "reasons": []}
    # Each line carries its job's facts as they are now, as `hpc-runner audit` does.
    assert {(item["source"], item["principal"], item["account"], item["grant"], item["slurm_id"],
             item["state"], item["exit_status"]) for item in api} == {
        ("api", "github:user:erin", "ocean", "ocean-ci", "4241", "cancelled", 143)}

    local = [item for item in entries if item["job_id"] == LOCAL_JOB]
    assert [item["action"] for item in local] == ["registered", "state", "state", "final_status"]
    assert local[0]["actor"] == "agent:login-a" and local[0]["detail"]["source"] == "local"
    assert local[1]["detail"]["to"] == "pending" and local[1]["detail"]["slurm_id"] == "4242"
    assert {(item["source"], item["principal"], item["account"], item["grant"], item["state"],
             item["exit_status"]) for item in local} == {
        ("local", "local:user:alice", "ocean", "ocean-local", "succeeded", 0)}
    assert {item["job_id"] for item in entries} == {trail.api_job, LOCAL_JOB}

    # Without an account: every account the token administers, which is ocean alone.
    assert (await trail.read(admin(trail)))[2] == entries


async def test_owners_and_members_get_403_and_an_admin_sees_nothing_of_another_account(trail: Trail) -> None:
    await ocean_and_sea(trail)
    hub = trail.hub
    owner, member = hub.token(SUBMITTER, actor="erin"), hub.token("Ocean/Member.jl", actor="mia")
    # Both may see the API job, and neither reads its trail.
    for token in (owner, member):
        assert (await hub.call("GET", f"/api/v1/jobs/{trail.api_job}", token=token))[0] == 200
        status, _, entries, error = await trail.read(token, "?account=ocean")
        assert (status, entries) == (403, [])
        assert "'ocean'" in error["error"] and error["field"] == "account"
        status, _, _, error = await trail.read(token)
        assert status == 403 and "admins" in error["error"]
        status, _, _, error = await trail.read(token, f"?job={trail.api_job}")
        assert status == 403 and trail.api_job in error["error"]

    status, _, _, error = await trail.read(admin(trail), "?account=sea")
    assert status == 403 and "account 'sea'" in error["error"]
    status, _, _, error = await trail.read(admin(trail), f"?job={trail.sea_job}")
    assert status == 404
    assert trail.sea_job not in {item["job_id"] for item in (await trail.read(admin(trail)))[2]}
    sea = (await trail.read(admin(trail, "sea")))[2]
    assert {item["job_id"] for item in sea} == {trail.sea_job}
    assert [item["action"] for item in sea] == ["submitted", "accepted", "state", "final_status"]
    # No token, or a forged one: 401, and not a line of the trail.
    assert (await hub.call("GET", protocol.AUDIT_PATH))[0] == 401
    forged = hub.issuer.mint("github", forged=True, repository="Ocean/admin-tools",
                             repository_owner="Ocean", aud=AUDIENCE)
    assert (await trail.read(forged, "?account=ocean"))[0] == 401


async def test_since_job_and_after_filter_the_trail_and_a_bad_since_is_400_naming_it(trail: Trail) -> None:
    await ocean_and_sea(trail)
    token = admin(trail)
    everything = (await trail.read(token))[2]
    boundary = START + 120.0                     # the local job's registration
    later = (await trail.read(token, f"?since={rfc3339(boundary).replace('Z', '%2B00:00')}"))[2]
    assert later == [item for item in everything if item["time"] >= rfc3339(boundary)]
    assert later[0]["action"] == "registered" and len(later) < len(everything)
    assert (await trail.read(token, "?since=2026-01-01"))[2] == everything
    only = (await trail.read(token, f"?job={LOCAL_JOB}"))[2]
    assert only == [item for item in everything if item["job_id"] == LOCAL_JOB]
    assert (await trail.read(token, f"?job={LOCAL_JOB}&account=sea"))[0] == 403
    resumed = (await trail.read(token, f"?after={everything[2]['seq']}"))[2]
    assert resumed == everything[3:]

    for query, field in (("?since=yesterday", "since"), ("?since=2026-12-01T08:00:00", "since"),
                         ("?after=-1", "after"), ("?job=../x", "job"), ("?acount=ocean", "acount")):
        status, _, _, error = await trail.read(token, query)
        assert (status, error["field"]) == (400, field), query
    assert "since 'yesterday' is neither a date" in (await trail.read(token, "?since=yesterday"))[3]["error"]


async def test_a_cancel_at_the_dashboard_names_the_person_who_asked(trail: Trail) -> None:
    hub = trail.hub
    job_id = (await hub.submit(cluster="hpc1"))["id"]
    assert await hub.lease(cluster="hpc1") is not None
    assert (await hub.publish(job_id, "running", account="ocean", admins=("idp:user:olga",)))[0] == 200
    board = HubBoard(hub.server._jobs_thread, hub.server._wakeups)
    await board.cancel(Viewer("Olga", ("idp:group:hpc", "idp:user:olga")), job_id)
    with JobStore.open(trail.hub.server._state_dir) as store:
        entries = store.audit_trail(["idp:user:olga"], limit=100)
    assert [(item["action"], item["actor"]) for item in entries][-1] == ("cancel", "idp:user:olga")
    assert entries[-1]["detail"] == {"state": "running", "agent": "login-a"}


def test_what_the_hub_itself_ends_is_in_the_trail_as_the_hubs(tmp_path: Path) -> None:
    clock = [START]
    with JobStore.open(tmp_path, clock=lambda: clock[0]) as store:
        waiting = store.submit(new_job())
        store.request_cancel(waiting.id, "github:user:erin")       # nobody holds it: it ends at once
        lapsed = store.submit(new_job())
        assert store.lease("login-a", "hpc1", 60) is not None
        store.request_cancel(lapsed.id, "github:user:erin")        # its agent is asked ...
        clock[0] += 61
        assert store.lease("login-a", "hpc1", 60) is None          # ... and its lease ran out
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    try:
        rows = conn.execute("SELECT j.id, e.action, e.actor FROM job_events AS e JOIN jobs AS j"
                            " ON j.seq = e.job_seq ORDER BY e.seq").fetchall()
    finally:
        conn.close()
    for job_id in (waiting.id, lapsed.id):
        assert [(action, actor) for found, action, actor in rows if found == job_id] == [
            ("submitted", waiting.actor), ("cancel", "github:user:erin"), ("state", "hub"),
            ("final_status", "hub")]


async def test_a_trail_longer_than_a_batch_streams_whole_and_in_order(
        trail: Trail, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "AUDIT_BATCH", 2)
    await ocean_and_sea(trail)
    entries = (await trail.read(admin(trail)))[2]
    seqs = [item["seq"] for item in entries]
    assert len(entries) == 10 and seqs == sorted(set(seqs))


async def test_the_trail_cannot_be_rewritten_and_survives_a_restart(trail: Trail, tmp_path: Path) -> None:
    await ocean_and_sea(trail)
    before = (await trail.read(admin(trail)))[2]
    await trail.hub.server.close()
    conn = sqlite3.connect(tmp_path / "hub-state" / DB_FILENAME)
    try:
        for attack in ("DELETE FROM job_events", "UPDATE job_events SET actor = 'nobody'"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(attack)
    finally:
        conn.close()
    with JobStore.open(tmp_path / "hub-state") as store:
        again = store.audit_trail(caller_keys(OCEAN_ADMINS), limit=100)
    assert again == before


def test_jobs_stored_before_the_trail_began_get_their_arrival_and_end(tmp_path: Path) -> None:
    conn = open_database(tmp_path / DB_FILENAME, MIGRATIONS[:4], what="hub job store", holds="jobs")
    identity = '{"actor":"octocat","repository":"CliMA/X.jl","source":"github"}'
    conn.execute("INSERT INTO jobs (seq, id, job, identity, principals, origin, issuer, token, cluster,"
                 " state, exit_status, account, grant_name, created, ended, lease_agent, actor, source)"
                 " VALUES (1, '01abcdefghjkm', '{}', ?, '[]', 'api', 'gha', 't', 'hpc1', 'failed', 2,"
                 " 'clima', 'ci', 5, 9, 'login-a', 'github:user:octocat', 'api')", (identity,))
    conn.execute("INSERT INTO jobs (seq, id, job, identity, principals, origin, cluster, state, created,"
                 " lease_agent, source) VALUES (2, '01abcdefghjkn', '{}', '{\"source\":\"local\"}', '[]',"
                 " 'agent', 'hpc1', 'running', 6, 'login-b', 'local')")
    conn.executemany("INSERT INTO job_access (key, job_seq, role) VALUES (?, 1, 'admin'), (?, 2, 'admin')",
                     [("github:team:clima/leads", "github:team:clima/leads")])
    conn.commit()
    conn.close()
    with JobStore.open(tmp_path) as store:
        entries = store.audit_trail(["github:team:clima/leads"], limit=10)
    assert [(item["job_id"], item["action"], item["actor"], item["time"]) for item in entries] == [
        ("01abcdefghjkm", "submitted", "github:user:octocat", rfc3339(5)),
        ("01abcdefghjkn", "registered", "agent:login-b", rfc3339(6)),
        ("01abcdefghjkm", "final_status", "agent:login-a", rfc3339(9))]
    assert entries[2]["detail"]["state"] == "failed" and entries[2]["exit_status"] == 2


async def remote_audit(trail: Trail, tmp_path: Path, token: str, *args: str) -> tuple[int, str, str]:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ACTIONS_ID_TOKEN", "BUILDKITE", "HPC_RUNNER_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", "remote", "audit", *args, "--hub", trail.hub.url,
        "--token-file", str(token_file), cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_remote_audit_prints_the_lines_of_audit_and_says_why_the_hub_refused(
        trail: Trail, tmp_path: Path) -> None:
    await ocean_and_sea(trail)
    entries = (await trail.read(admin(trail)))[2]
    status, out, err = await remote_audit(trail, tmp_path, admin(trail), "--json", "--account", "ocean")
    assert (status, err) == (0, "")
    assert out == "".join(json_line(item) for item in entries)
    status, out, _ = await remote_audit(trail, tmp_path, admin(trail), "--job", LOCAL_JOB,
                                        "--since", "2026-01-01")
    assert status == 0
    assert out == "".join(text_line(item) for item in entries if item["job_id"] == LOCAL_JOB)
    assert f"registered job {LOCAL_JOB} by agent:login-a [source local, principal local:user:alice" in out

    status, out, err = await remote_audit(trail, tmp_path, trail.hub.token(SUBMITTER), "--account", "ocean")
    assert (status, out) == (125, "")
    assert "the hub refused the request (403)" in err and "'ocean'" in err
    status, _, err = await remote_audit(trail, tmp_path, admin(trail), "--since", "soon")
    assert status == 1 and "--since 'soon' is neither a date" in err

